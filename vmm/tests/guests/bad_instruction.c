/*
 * Prints a marker, then executes int3 with no IDT installed: KVM's emulator on
 * software-assisted hosts cannot run it (KVM_EXIT_INTERNAL_ERROR); on hardware KVM the
 * breakpoint with no IDT escalates to a triple fault (shutdown). Either way the VMM must
 * report it instead of hanging.
 */
#include "guest.h"

void main(void)
{
    serial_puts("before\n");
    __asm__ volatile("int3");
    serial_puts("after\n");
    guest_exit(0);
}
