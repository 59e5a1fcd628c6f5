/*
 * /init of the initramfs the Linux-guest test boots: a static user program that writes a
 * marker line to the console, waits until the UART has sent it, and reboots. With `reboot=t`
 * on the kernel command line the reboot is a triple fault, which ends the microVM with a
 * shutdown.
 */
#include <fcntl.h>
#include <string.h>
#include <sys/reboot.h>
#include <termios.h>
#include <unistd.h>

#define MARKER "sessiond-linux-init: hello from user space\n"

int main(void)
{
    int fd = open("/dev/console", O_WRONLY | O_NOCTTY);
    if (fd < 0)
        fd = 1;
    if (write(fd, MARKER, strlen(MARKER)) < 0)
        return 1;
    tcdrain(fd);
    sync();
    reboot(RB_AUTOBOOT);
    return 1;
}
