/*
 * Starts the secondary vCPUs the way Linux starts its APs, and proves they run concurrently.
 *
 * The BSP copies a real-mode trampoline to TRAMPOLINE (a free page below 1 MiB: the GDT is
 * at 0x500, the zero page at 0x7000, the boot stack and page tables from 0x8000), then for
 * each APIC id 1..cpus-1 sends INIT, then SIPI twice (as the MP specification says) through
 * its local APIC's ICR, and waits for that AP to check in. An AP begins in real mode at
 * CS:IP = (vector << 8):0, goes to 32-bit protected mode (the trampoline's own GDT: the boot
 * GDT has no 32-bit code segment), then to long mode on the VMM's identity page tables (CR3 =
 * 0x9000, CR4.PAE, EFER.LME, CR0.PG), takes a stack by `lock xadd` on a shared index and
 * calls ap_main: it records its APIC id, sets its LAPIC task priority to a value of its own
 * and `lock inc`s the arrival count.
 *
 * Then every CPU takes ROUNDS turns at a shared computation, in strict rotation (CPU k acts
 * when turn % cpus == k): a result that only comes out right if every CPU ran its turns
 * while the others waited for theirs.
 *
 * The host can make the BSP hold at one gate (STOP_AT), saying so in AT_GATE, until it
 * writes that gate's number to GATE, so it can snapshot there: gate 1 is between the INIT
 * and the SIPIs for APIC id 1 (that AP has taken INIT and waits for SIPI, the others have
 * not been touched); gate 2 is halfway through the rounds, on the BSP's turn (every vCPU
 * is running guest code, the APs spinning for their next turn).
 *
 * After the rounds each CPU reads its LAPIC TPR back (per-vCPU LAPIC state survived), the
 * BSP prints one line per CPU and a summary line, and exits 0. An AP ends in `cli; hlt`.
 *
 * Host input: CPUS (the vCPU count) and STOP_AT before boot, GATE to release the BSP.
 * Exit status: 0, or 2 (bad CPUS), 3 (an AP never checked in).
 */
#include "lapic.h"

#define MAX_CPUS 32
#define ROUNDS 8
/* Below 1 MiB, 4 KiB aligned: its page number is the SIPI vector. */
#define TRAMPOLINE 0x6000
#define XSTR(x) STR(x)
#define STR(x) #x

#define GATE MAILBOX                         /* host writes the gate's number to open it */
#define CPUS ((volatile u64 *)0x300010)      /* host writes the vCPU count before boot */
#define AT_GATE ((volatile u64 *)0x300018)   /* the gate the BSP waits at, 0 when none */
#define STOP_AT ((volatile u64 *)0x300020)   /* host: the gate to hold at (0: none) */
#define GATE_BEFORE_SIPI 1
#define GATE_HALFWAY 2


/* Written by the APs' assembly entry and read by C: not static. */
u32 ap_next;
u8 ap_stacks[MAX_CPUS - 1][4096] __attribute__((aligned(16)));

static volatile u32 arrived;
static volatile u32 done;
static volatile u64 turn;
static volatile u64 acc;
static volatile u32 apic_ids[MAX_CPUS];
static volatile u32 turns[MAX_CPUS];
static volatile u32 lapic_kept[MAX_CPUS];
static u64 ncpus;

/*
 * The trampoline (copied to TRAMPOLINE, so its own addresses are computed from there) and
 * the APs' 64-bit entry, which stays in the image at 1 MiB.
 */
__asm__(".text\n"
        ".globl smp_trampoline_start, smp_trampoline_end\n"
        ".code16\n"
        "smp_trampoline_start:\n"
        "cli\n"
        "cld\n"
        "mov %cs, %ax\n"
        "mov %ax, %ds\n"
        "lgdtl tramp_gdt_ptr - smp_trampoline_start\n"
        "mov %cr0, %eax\n"
        "or $1, %eax\n" /* PE */
        "mov %eax, %cr0\n"
        "ljmpl $0x18, $(" XSTR(TRAMPOLINE) " + tramp_pm32 - smp_trampoline_start)\n"
        ".code32\n"
        "tramp_pm32:\n"
        "mov $0x10, %ax\n"
        "mov %ax, %ds\n"
        "mov %ax, %es\n"
        "mov %ax, %ss\n"
        "mov %cr4, %eax\n"
        "or $0x20, %eax\n" /* PAE */
        "mov %eax, %cr4\n"
        "mov $0x9000, %eax\n" /* the VMM's identity-mapping PML4 (layout.rs PML4_ADDR) */
        "mov %eax, %cr3\n"
        "mov $0xc0000080, %ecx\n" /* EFER */
        "rdmsr\n"
        "or $0x100, %eax\n" /* LME */
        "wrmsr\n"
        "mov %cr0, %eax\n"
        "or $0x80000000, %eax\n" /* PG: long mode is active from here */
        "mov %eax, %cr0\n"
        "ljmp $0x08, $ap_entry64\n"
        ".align 8\n"
        "tramp_gdt:\n"
        ".quad 0\n"
        ".quad 0x00af9b000000ffff\n" /* 0x08: 64-bit code, as in the boot GDT */
        ".quad 0x00cf93000000ffff\n" /* 0x10: flat data, as in the boot GDT */
        ".quad 0x00cf9b000000ffff\n" /* 0x18: flat 32-bit code */
        "tramp_gdt_ptr:\n"
        ".word tramp_gdt_ptr - tramp_gdt - 1\n"
        ".long " XSTR(TRAMPOLINE) " + tramp_gdt - smp_trampoline_start\n"
        "smp_trampoline_end:\n"
        ".code64\n"
        "ap_entry64:\n"
        "mov $0x10, %eax\n"
        "mov %eax, %ds\n"
        "mov %eax, %es\n"
        "mov %eax, %ss\n"
        "mov %eax, %fs\n"
        "mov %eax, %gs\n"
        /* This AP's number among the CPUs: 1 + how many APs took one before it. */
        "mov $1, %eax\n"
        "lock xaddl %eax, ap_next(%rip)\n"
        "lea 1(%rax), %edi\n"
        /* Stack: the top of ap_stacks[cpu - 1]. */
        "mov %rdi, %rax\n"
        "shl $12, %rax\n"
        "lea ap_stacks(%rip), %rsp\n"
        "add %rax, %rsp\n"
        "call ap_main\n"
        "1: cli\n"
        "hlt\n"
        "jmp 1b\n");

extern const u8 smp_trampoline_start[], smp_trampoline_end[];


static inline void lock_inc(volatile u32 *p) { __asm__ volatile("lock incl %0" : "+m"(*p) : : "memory"); }

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static void put_kv(const char *key, u64 v)
{
    serial_puts(key);
    serial_putc('=');
    serial_dec(v);
}

static u32 my_tpr(u64 cpu) { return (u32)((cpu + 1) << 4); }

/* Holds the BSP at `gate` if the host asked for it, until the host opens it. */
static void hold(u64 gate)
{
    if (*STOP_AT != gate)
        return;
    *AT_GATE = gate;
    while (*GATE != gate)
        __asm__ volatile("pause" ::: "memory");
    *AT_GATE = 0;
}

/* CPU `cpu`'s ROUNDS turns; the BSP stops at the gate halfway, on its own turn. */
static void compute(u64 cpu)
{
    for (u64 r = 0; r < ROUNDS; r++) {
        u64 mine = r * ncpus + cpu;
        while (turn != mine)
            __asm__ volatile("pause" ::: "memory");
        if (cpu == 0 && r == ROUNDS / 2)
            hold(GATE_HALFWAY);
        /* Order-sensitive: any other interleaving gives another value. */
        acc = acc * 31 + (cpu + 1) * 1000 + r;
        turns[cpu]++;
        *PROGRESS = mine + 1;
        turn = mine + 1; /* x86 keeps stores in order: acc is visible before the turn moves */
    }
    lapic_kept[cpu] = (lapic_read(LAPIC_TPR) & 0xff) == my_tpr(cpu);
}

void ap_main(u64 cpu)
{
    apic_ids[cpu] = lapic_read(LAPIC_ID) >> 24;
    lapic_write(LAPIC_TPR, my_tpr(cpu));
    lock_inc(&arrived);
    compute(cpu);
    lock_inc(&done);
}

/*
 * INIT, then two SIPIs. The specification's delays (10 ms after INIT, 200 us between the
 * SIPIs) are for real hardware; KVM's LAPIC delivers each IPI before the ICR write returns.
 * A second SIPI that finds the AP already running is ignored, as on hardware.
 */
static void start_ap(u32 apic_id)
{
    send_ipi(apic_id, ICR_INIT_ASSERT);
    send_ipi(apic_id, ICR_INIT_DEASSERT);
    if (apic_id == 1)
        hold(GATE_BEFORE_SIPI);
    for (int i = 0; i < 2; i++)
        send_ipi(apic_id, ICR_STARTUP | (TRAMPOLINE >> 12));
}

void main(void)
{
    ncpus = *CPUS;
    if (ncpus < 1 || ncpus > MAX_CPUS) {
        serial_puts("bad cpu count\n");
        guest_exit(2);
    }
    /* Volatile copy: gcc would otherwise turn the loop into a memcpy call it cannot link. */
    volatile u8 *dst = (volatile u8 *)TRAMPOLINE;
    for (const u8 *p = smp_trampoline_start; p < smp_trampoline_end; p++)
        *dst++ = *p;

    lapic_write(LAPIC_SVR, 0x1ff); /* software-enable the BSP's LAPIC, spurious vector 0xff */
    apic_ids[0] = lapic_read(LAPIC_ID) >> 24;
    lapic_write(LAPIC_TPR, my_tpr(0));

    /* One AP at a time, as Linux does: AP k gets CPU number k and a predictable report. */
    for (u32 id = 1; id < ncpus; id++) {
        start_ap(id);
        u64 start = rdtsc();
        while (arrived != id) {
            /* ~10 s at 2 GHz: far beyond any start, even with every instruction emulated. */
            if (rdtsc() - start > 20000000000UL) {
                serial_puts("ap ");
                serial_dec(id);
                serial_puts(" never started\n");
                guest_exit(3);
            }
            __asm__ volatile("pause" ::: "memory");
        }
    }

    compute(0);
    while (done != ncpus - 1)
        __asm__ volatile("pause" ::: "memory");

    u64 id_mask = 0, kept = 0;
    for (u64 c = 0; c < ncpus; c++) {
        put_kv("cpu", c);
        put_kv(" apic_id", apic_ids[c]);
        put_kv(" turns", turns[c]);
        put_kv(" lapic_kept", lapic_kept[c]);
        serial_putc('\n');
        id_mask |= 1UL << apic_ids[c];
        kept += lapic_kept[c];
    }
    put_kv("smp cpus", ncpus);
    put_kv(" arrived", arrived);
    put_kv(" done", done);
    put_kv(" id_mask", id_mask);
    put_kv(" lapic_kept", kept);
    put_kv(" acc", acc);
    serial_putc('\n');
    guest_exit(0);
}
