//! Fused float32 CPU kernels for the encoder hot path.
//!
//! candle runs a BERT layer as a dozen separate passes, each allocating its output; on a CPU most
//! of the time outside the matrix products goes there. These kernels do the same arithmetic in
//! fewer passes over packed rows (padding removed): matrix products on weights packed at load,
//! with bias + activation applied to each block of output as it is finished ([`Epilogue`]), one
//! pass for bias + residual + LayerNorm,
//! and attention per (sequence, head) with the scale and softmax folded in, so no
//! `[batch, heads, seq, seq]` tensor or head transposes are ever built.
//!
//! Elementwise loops are compiled three times (AVX-512, AVX2+FMA, baseline) and picked at run time.

#[cfg(target_arch = "x86_64")]
mod amx;
pub mod attention;
pub mod bf16;
pub mod dense;
pub mod int8;
pub mod math;
pub mod packed;
pub mod rotary;

use candle_core::{DType, Device, Tensor};

pub use attention::{attention, AttentionProducts, AttentionShape};
pub use bf16::PackedBf16;
pub use dense::{
    bias_activation, bias_residual_layer_norm, gated_activation, layer_norm, layer_norm_columns,
    low_rank_update, matmul, residual_add, residual_then_layer_norm, residual_then_rms_norm,
    rms_norm, rms_norm_columns, Epilogue,
};
pub use int8::PackedI8;
pub use packed::PackedF32;
pub use rotary::{rotary, RotaryTable};

/// Defines a function whose body is compiled for AVX-512 and AVX2 as well as the baseline, and
/// dispatched on what the CPU has. The body is called once per block of rows, not per element.
macro_rules! simd_function {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) { body($($arg),*) }
                if $crate::kernels::cpu_has_avx512() {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::kernels::cpu_has_avx2() {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use simd_function;

#[cfg(target_arch = "x86_64")]
pub(crate) fn cpu_has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn cpu_has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Whether `t` can take the fused path: float32 in host memory.
pub fn on_cpu_f32(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// Borrows a contiguous float32 CPU tensor's data without copying.
pub struct HostSlice<'a> {
    guard: candle_core::StorageRef<'a>,
    range: std::ops::Range<usize>,
}

impl<'a> HostSlice<'a> {
    pub fn of(t: &'a Tensor) -> candle_core::Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused kernels need a contiguous tensor, got {:?}", layout)
        };
        match &*guard {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(_)) => {}
            _ => candle_core::bail!("fused kernels need a float32 CPU tensor"),
        }
        Ok(Self {
            guard,
            range: start..end,
        })
    }
}

impl std::ops::Deref for HostSlice<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &*self.guard {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => &v[self.range.clone()],
            _ => &[],
        }
    }
}

/// An output buffer shared by parallel tasks that each write their own disjoint region of it
/// (a column strip, a head's columns of some rows), which safe slices cannot express.
#[derive(Clone, Copy)]
pub(crate) struct DisjointWrites(*mut f32);

// SAFETY: the tasks holding copies write disjoint elements, and the buffer outlives them.
unsafe impl Send for DisjointWrites {}
unsafe impl Sync for DisjointWrites {}

impl DisjointWrites {
    pub(crate) fn new(buffer: &mut [f32]) -> Self {
        Self(buffer.as_mut_ptr())
    }

    /// Over memory not yet written, which the tasks fill before anything reads it.
    pub(crate) fn uninit(buffer: &mut [std::mem::MaybeUninit<f32>]) -> Self {
        Self(buffer.as_mut_ptr().cast())
    }

    /// # Safety
    /// `offset` must be inside the buffer, and what is written there must belong to the caller's
    /// task alone.
    pub(crate) unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: per the caller.
        unsafe { self.0.add(offset) }
    }
}

/// Frees `buffer` if its capacity is over `bytes`: a worker's scratch keeps what ordinary inputs
/// need, not what the longest one did.
pub(crate) fn release_over<T>(buffer: &mut Vec<T>, bytes: usize) {
    if buffer.capacity() * std::mem::size_of::<T>() > bytes {
        *buffer = Vec::new();
    }
}

/// Rows per parallel task for elementwise passes: enough work to amortize scheduling.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}
