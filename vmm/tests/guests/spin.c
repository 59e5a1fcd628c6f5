/* Counts forever in PROGRESS: a guest that is always running, for snapshot benchmarks. */
#include "guest.h"

void main(void)
{
    serial_putc('!');
    for (u64 i = 1;; i++)
        *PROGRESS = i;
}
