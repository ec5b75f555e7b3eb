# A multiboot entry for the freestanding AMX check (run.sh): GRUB starts it in
# 32-bit protected mode; it maps the first 1 GiB with 2 MiB pages, enters long
# mode, turns on SSE, AVX, AVX-512 and both AMX tile states in XCR0 directly
# (no OS, so no permission request), and calls `kmain`.
    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002
    .long 0
    .long -0x1BADB002

    .section .bss
    .align 4096
pml4: .skip 4096
pdpt: .skip 4096
pd:   .skip 4096
stack: .skip 1048576
stack_top:

    .section .text
    .code32
    .global _start
_start:
    cli
    mov $stack_top, %esp
    mov $pdpt, %eax
    or $3, %eax
    mov %eax, pml4
    mov $pd, %eax
    or $3, %eax
    mov %eax, pdpt
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, pd(,%ecx,8)
    movl $0, pd+4(,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jne 1b
    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $((1<<5)|(1<<9)|(1<<10)|(1<<18)), %eax
    mov %eax, %cr4
    mov $0xC0000080, %ecx
    rdmsr
    or $(1<<8), %eax
    wrmsr
    mov %cr0, %eax
    and $~((1<<2)|(1<<3)), %eax
    or $((1<<31)|(1<<1)|1), %eax
    mov %eax, %cr0
    lgdt gdt_ptr
    ljmp $0x08, $long_entry

    .code64
long_entry:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $stack_top, %rsp
    fninit
    xor %ecx, %ecx
    mov $0x600e7, %eax
    xor %edx, %edx
    xsetbv
    call kmain
2:  cli
    hlt
    jmp 2b

    .section .data
    .align 8
gdt:
    .quad 0
    .quad 0x00209A0000000000
    .quad 0x0000920000000000
gdt_ptr:
    .word 23
    .long gdt
