/* Prints a line on the serial console, then exits with status 42. */
#include "guest.h"

void main(void)
{
    serial_puts("hello from the guest\n");
    guest_exit(42);
}
