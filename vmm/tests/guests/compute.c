/*
 * A computation long enough to be snapshotted in the middle: a hash over N steps that also
 * samples one word from each 4 KiB page of a 16 MiB data area the host filled before boot.
 * Progress goes to PROGRESS; at the end the host's MAILBOX value is added, so clones restored
 * from one snapshot diverge when fed different input. Prints the result and exits 0.
 */
#include "guest.h"

#define N 40000
#define DATA ((volatile u64 *)0x1000000)
#define DATA_PAGES 4096

void main(void)
{
    u64 acc = 0;
    for (u64 i = 1; i <= N; i++) {
        acc = acc * 31 + i + DATA[(i % DATA_PAGES) * 512];
        *PROGRESS = i;
    }
    acc += *MAILBOX;
    serial_puts("result=");
    serial_hex(acc);
    serial_puts("\n");
    guest_exit(0);
}
