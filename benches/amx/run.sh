#!/bin/bash
# Checks palaver's AMX tile kernels (src/llm/amx.rs: Q8_0, Q4_K, Q6_K) bit for bit against a
# scalar reference on an emulated Sapphire Rapids, for machines without AMX.
#
#   BOCHS=/path/to/bochs benches/amx/run.sh
#
# Needs: rustc, GNU as/ld, gcc, grub-mkrescue (grub-pc-bin, mtools, xorriso),
# and Bochs built from its sources with `--enable-x86-64 --enable-avx
# --enable-evex --enable-amx --with-nogui`. Bochs's sources of 2026-08 treat
# the signed bytes of tdpbssd, tdpbsud and tdpbusd as unsigned (each byte
# widened to 32 bits without sign extension in cpu/avx/amx.cc); sign-extend
# them before building, or every signed product comes out wrong. The check
# boots a freestanding binary (no OS: Bochs does not run Linux with tiles)
# and prints one line per random shape that differs, then a summary.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bochs=${BOCHS:?set BOCHS to a Bochs binary built with --enable-amx}
bios=${BOCHS_BIOS:-$(dirname "$bochs")/bios}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
as --64 "$here/boot.S" -o boot.o
gcc -O1 -ffreestanding -fno-builtin -fno-tree-loop-distribute-patterns -mno-red-zone -fno-pic -c "$here/mem.c" -o mem.o
rustc --edition 2021 -O -C panic=abort -C relocation-model=static --crate-type staticlib "$here/amx_check.rs" -o libcheck.a
ld -n -T "$here/link.ld" --gc-sections boot.o mem.o libcheck.a -o kernel.elf 2>/dev/null
mkdir -p iso/boot/grub && cp kernel.elf iso/boot/
printf 'multiboot /boot/kernel.elf\nboot\n' > iso/boot/grub/grub.cfg
grub-mkrescue -o check.iso iso > grub.log 2>&1
cat > bochsrc <<CFG
megs: 256
cpu: model=sapphire_rapids, reset_on_triple_fault=0
romimage: file=$bios/BIOS-bochs-latest
vgaromimage: file=$bios/VGABIOS-lgpl/VGABIOS-lgpl-latest.bin
ata0-master: type=cdrom, path=$work/check.iso, status=inserted
boot: cdrom
display_library: nogui
port_e9_hack: enabled=1
log: $work/bochs.log
CFG
# The check ends in a halt; Bochs keeps running until the time limit.
timeout "${SECONDS_LIMIT:-240}" "$bochs" -q -f bochsrc > out.txt 2>&1 || true
grep -a -E "differ|random shapes|PANIC" out.txt
! grep -a "random shapes" out.txt | grep -qv " 0 with differences"; [ "$(grep -ac "random shapes, 0 with differences" out.txt)" -ge 3 ]
