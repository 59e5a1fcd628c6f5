/* Reads COM1's line status register forever, one port read (a VM exit) per iteration. */
#include "guest.h"

void main(void)
{
    for (u64 i = 0;; i++) {
        *PROGRESS = i;
        (void)inb(COM1 + 5);
    }
}
