// bptrace: which functions of a program run, in the order they first run.
//
// Usage: bptrace FUNCS OUT PROGRAM [ARGS...]
//   FUNCS: lines "HEXADDR NAME" (addresses as in the ELF file, `nm -n` output filtered to text symbols)
//   OUT:   receives the NAME of each function the first time it runs, one per line
//
// It starts PROGRAM under ptrace, writes an int3 over the first byte of every listed function (through
// /proc/PID/mem, one write for the whole text), and on each trap records the function, puts its byte back
// and lets the thread go on: a function costs one stop the first time and nothing after. Threads the program
// starts are followed. It ends when the program ends (kill it when the workload is done).
//
// Why not a sampling profiler: sampling misses short functions, and the point is the complete set of code a
// serving Vigil touches, so the linker can lay it out contiguously (Bench/orderfile.py says why).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

struct fn { uint64_t addr; char *name; unsigned char orig; int state; /* 0 armed, 1 hit */ };
static struct fn *fns;
static size_t nfns;

static int cmp(const void *a, const void *b) {
    uint64_t x = ((const struct fn *)a)->addr, y = ((const struct fn *)b)->addr;
    return x < y ? -1 : x > y;
}

static struct fn *find(uint64_t addr) {
    size_t lo = 0, hi = nfns;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (fns[mid].addr < addr) lo = mid + 1; else hi = mid;
    }
    return lo < nfns && fns[lo].addr == addr ? &fns[lo] : NULL;
}

// The start address of PROGRAM's mapping at file offset 0 (the load base of a position-independent executable).
static uint64_t load_base(pid_t pid, const char *program) {
    char path[64], line[4096], exe[4096];
    snprintf(path, sizeof path, "/proc/%d/exe", pid);
    ssize_t n = readlink(path, exe, sizeof exe - 1);
    if (n < 0) { perror("readlink"); exit(1); }
    exe[n] = 0;
    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    FILE *f = fopen(path, "r");
    if (!f) { perror("maps"); exit(1); }
    uint64_t base = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long start, offset;
        char file[4096] = "";
        if (sscanf(line, "%lx-%*lx %*s %lx %*s %*s %4095s", &start, &offset, file) >= 2 && offset == 0 &&
            strcmp(file, exe) == 0) { base = start; break; }
    }
    fclose(f);
    if (!base) { fprintf(stderr, "bptrace: no mapping of %s\n", program); exit(1); }
    return base;
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: bptrace FUNCS OUT PROGRAM [ARGS...]\n"); return 2; }
    FILE *in = fopen(argv[1], "r");
    if (!in) { perror(argv[1]); return 1; }
    size_t cap = 1 << 16;
    fns = malloc(cap * sizeof *fns);
    char line[8192];
    while (fgets(line, sizeof line, in)) {
        char *end;
        uint64_t addr = strtoull(line, &end, 16);
        while (*end == ' ') end++;
        end[strcspn(end, "\n")] = 0;
        if (!*end) continue;
        if (nfns == cap) fns = realloc(fns, (cap *= 2) * sizeof *fns);
        fns[nfns++] = (struct fn){addr, strdup(end), 0, 0};
    }
    fclose(in);
    qsort(fns, nfns, sizeof *fns, cmp);
    size_t uniq = 0;  // aliases share an address: keep one breakpoint per address
    for (size_t i = 0; i < nfns; i++) if (uniq == 0 || fns[uniq - 1].addr != fns[i].addr) fns[uniq++] = fns[i];
    nfns = uniq;
    FILE *out = fopen(argv[2], "w");
    if (!out) { perror(argv[2]); return 1; }

    pid_t child = fork();
    if (child == 0) {
        ptrace(PTRACE_TRACEME, 0, 0, 0);
        execv(argv[3], argv + 3);
        perror("execv");
        _exit(127);
    }
    int status;
    if (waitpid(child, &status, 0) < 0 || !WIFSTOPPED(status)) { fprintf(stderr, "bptrace: no exec stop\n"); return 1; }
    ptrace(PTRACE_SETOPTIONS, child, 0, PTRACE_O_TRACECLONE | PTRACE_O_EXITKILL);

    uint64_t base = load_base(child, argv[3]);
    char mempath[64];
    snprintf(mempath, sizeof mempath, "/proc/%d/mem", child);
    int mem = open(mempath, O_RDWR);
    if (mem < 0) { perror(mempath); return 1; }
    uint64_t lo = fns[0].addr, hi = fns[nfns - 1].addr + 1;
    unsigned char *text = malloc(hi - lo);
    if (pread(mem, text, hi - lo, base + lo) != (ssize_t)(hi - lo)) { perror("read text"); return 1; }
    for (size_t i = 0; i < nfns; i++) {
        fns[i].orig = text[fns[i].addr - lo];
        text[fns[i].addr - lo] = 0xcc;
    }
    if (pwrite(mem, text, hi - lo, base + lo) != (ssize_t)(hi - lo)) { perror("write text"); return 1; }
    free(text);

    size_t hits = 0;
    ptrace(PTRACE_CONT, child, 0, 0);
    for (;;) {
        pid_t pid = waitpid(-1, &status, __WALL);
        if (pid < 0) { if (errno == EINTR) continue; break; }
        if (WIFEXITED(status) || WIFSIGNALED(status)) {
            if (pid == child) break;
            continue;
        }
        if (!WIFSTOPPED(status)) continue;
        int sig = WSTOPSIG(status);
        int inject = 0;
        if (sig == SIGTRAP && (status >> 16) == 0) {
            struct user_regs_struct regs;
            ptrace(PTRACE_GETREGS, pid, 0, &regs);
            struct fn *f = find(regs.rip - 1 - base);
            if (f) {
                if (f->state == 0) {  // first run: record it and put its byte back
                    f->state = 1;
                    pwrite(mem, &f->orig, 1, base + f->addr);
                    fprintf(out, "%s\n", f->name);
                    hits++;
                }
                // (a thread that trapped on it before the byte went back only needs to step back)
                regs.rip -= 1;
                ptrace(PTRACE_SETREGS, pid, 0, &regs);
            } else {
                inject = sig;  // a trap that is not ours
            }
        } else if (sig == SIGTRAP || (sig == SIGSTOP && (status >> 16) == 0 && pid != child)) {
            inject = 0;  // ptrace events (clone), and the stop a new thread starts with
        } else {
            inject = sig;  // the program's own signals go through
        }
        ptrace(PTRACE_CONT, pid, 0, inject);
        if (hits % 256 == 0) fflush(out);
    }
    fclose(out);
    fprintf(stderr, "bptrace: %zu of %zu functions ran\n", hits, nfns);
    return 0;
}
