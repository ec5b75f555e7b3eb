//! What the CPU can run, detected once at run time: the int8 kernels of the
//! encoder and of the decoder need AVX-512 (F, BW) with VNNI. Also the f32
//! dot product and sum the crate's hand-written loops share.

/// Whether 512-bit f32 vectors (AVX-512 F) are there.
pub fn avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether `vpdpbusd` on 512-bit registers (AVX-512 F, BW and VNNI) is there.
pub fn avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether AMX int8 tiles are there and this process may use them: the CPU
/// has AMX-TILE and AMX-INT8 (and AVX-512 F for the kernel's bookkeeping), and
/// Linux granted the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`),
/// without which the first tile instruction would kill the process.
/// `PALAVER_AMX=off` keeps the VNNI kernels (the results are the same bit for
/// bit; the switch is for comparing speeds). Checked once.
pub fn amx() -> bool {
    static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMX.get_or_init(|| amx_in_cpu() && std::env::var("PALAVER_AMX").map_or(true, |v| v != "off") && amx_permitted())
}

/// AMX-TILE and AMX-INT8 in CPUID (leaf 7, EDX bits 24 and 25), with AVX-512 F.
pub fn amx_in_cpu() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID leaf 7 exists on every x86-64 CPU with AVX-512.
        avx512f() && {
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            edx & (1 << 24) != 0 && edx & (1 << 25) != 0
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Asks Linux for the tile data state (granted once per process).
///
/// Linux refuses (`ENOSPC`) while any thread has an alternate signal stack
/// too small for a signal frame holding the 8 KiB of tiles. Rust's own
/// threads (tokio's, rayon's) size theirs from `AT_MINSIGSTKSZ`, which counts
/// every state the CPU has, tiles included, so asking late, from a worker of
/// a running server, works; a refusal is logged and the VNNI kernels run.
fn amx_permitted() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a request for a permission; it touches no memory of ours.
        let granted = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 };
        if !granted {
            let e = std::io::Error::last_os_error();
            tracing::warn!("the CPU has AMX but Linux did not grant its tile state ({e}); matmuls run on AVX-512 VNNI");
        }
        granted
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// Dot product in 16 independent lanes summed as a tree, so that it
/// vectorises and its reduction is a few shuffles rather than 15 dependent
/// adds (a single accumulator would pin the order and stay scalar).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    lane_tree_sum(&acc) + tail
}

/// Sum in 16 independent lanes summed as a tree, for the same reason as `dot`.
#[inline]
pub fn sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = v.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    lane_tree_sum(&acc) + tail
}

/// The 16 lanes of an accumulator added as a tree of halves. Spelled out level
/// by level: written as a loop over the widths it compiled to scalar stores.
#[inline(always)]
pub fn lane_tree_sum(acc: &[f32; 16]) -> f32 {
    let h8: [f32; 8] = std::array::from_fn(|i| acc[i] + acc[i + 8]);
    let h4: [f32; 4] = std::array::from_fn(|i| h8[i] + h8[i + 4]);
    (h4[0] + h4[2]) + (h4[1] + h4[3])
}

/// Keeps freed memory in the process for the next request instead of
/// returning it to the kernel. A prompt pass allocates activations of tens of
/// MB per layer; each block the process gives back comes again as fresh pages
/// that the kernel zeroes on first touch. Blocks up to 32 MB (glibc's
/// ceiling) come from the heap rather than their own `mmap`, and the heap is
/// never trimmed.
///
/// The top pad keeps the other threads' arenas too: glibc unmaps a 64 MB heap
/// of a thread's arena as soon as it is empty, whatever the trim threshold,
/// unless the pad asks for that much room at the top. Without it a 256-row
/// prompt pass of the 1.5B model still took about 250,000 page faults and
/// 8-19% of its time; with it, none after load. (One arena for every thread
/// does the same for prompts but slowed decode by 8%: `_int_malloc` searching
/// the single arena's bins.) Call once, at start-up.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[cfg(test)]
mod tests {
    /// CPUID's answer agrees with the kernel's (`/proc/cpuinfo` flags), and
    /// Linux never grants the tile state where the CPU has no tiles. (Where
    /// it has them, a kernel before 5.16 refuses: the VNNI kernels run.)
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn amx_detection_agrees_with_the_kernel() {
        let info = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo");
        let flags: Vec<&str> = info.lines().find(|l| l.starts_with("flags")).expect("a flags line").split_whitespace().collect();
        let kernel = ["avx512f", "amx_tile", "amx_int8"].iter().all(|f| flags.contains(f));
        assert_eq!(super::amx_in_cpu(), kernel, "CPUID and /proc/cpuinfo disagree on AMX");
        let granted = super::amx_permitted();
        assert!(kernel || !granted, "tile state granted on a CPU without AMX");
        eprintln!("AMX: in the CPU {kernel}, tile state granted {granted}");
    }
}
