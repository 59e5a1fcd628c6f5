/* Reads one byte from test port 0x510, stores it in the progress mailbox, exits with it. */
#include "guest.h"

void main(void)
{
    u8 v = inb(0x510);
    *PROGRESS = v;
    guest_exit(v);
}
