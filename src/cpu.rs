//! What the CPU can run, detected once at run time: the int8 kernels of the
//! encoder and of the decoder need AVX-512 (F, BW) with VNNI.

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
