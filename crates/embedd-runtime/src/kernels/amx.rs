//! bfloat16 products on Intel AMX (Sapphire Rapids and later), on [`PackedBf16`]'s weights.
//!
//! `tdpbf16ps` multiplies a 16 x 32 bfloat16 tile by a 32 x 16 one into 16 x 16 float32 sums:
//! 16 times the work of one `vdpbf16ps`. On such CPUs the AVX-512 BF16 kernel runs at about half
//! the float32 FMA rate (`../shared/tools/cpu-peak`: 110-122 against 212-244 GFLOP/s on one
//! machine), so bf16 was slower than f32 there; the tile unit is what makes it faster.
//!
//! The right-hand tile wants 16 rows of (16 columns x 2 consecutive `k`): exactly one 16-lane
//! vector of [`PackedBf16`]'s layout per pair of `k`, so a tile is 16 such vectors read at the
//! strip's stride (a pair's two vectors, 128 bytes). The same packed weights feed both kernels.
//!
//! [`PackedBf16`]: super::PackedBf16

use std::sync::OnceLock;

use rayon::prelude::*;

use super::packed::{padded_width, strip_columns, STRIP};
use super::{DisjointWrites, Epilogue};

/// Rows of the left operand per tile.
pub(crate) const TILE_ROWS: usize = 16;
/// Pairs of `k` per tile step (32 bfloat16 values, a tile row's 64 bytes).
const TILE_PAIRS: usize = 16;

/// Whether this process runs AMX-BF16: the CPU has it, Linux granted the tile state, and
/// `EMBEDD_NO_AMX` is unset or empty (to measure or rule out the AVX-512 kernel on such a CPU).
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

/// Whether a product over `pairs` pairs of `k` runs on the tiles (whole tile steps only: the
/// packed strips hold no padding beyond `pairs`).
pub(crate) fn takes(pairs: usize) -> bool {
    pairs > 0 && pairs.is_multiple_of(TILE_PAIRS) && available()
}

fn detect() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        let opted_out = std::env::var_os("EMBEDD_NO_AMX").is_some_and(|v| !v.is_empty());
        if opted_out || !super::bf16::available() {
            return false;
        }
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = ((leaf7.edx >> 22) & 1 == 1, (leaf7.edx >> 24) & 1 == 1);
        if !(amx_bf16 && amx_tile) {
            return false;
        }
        // Linux gives a process the 8 KiB tile state only when it asks for it
        // (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); a kernel without AMX support refuses.
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: this arch_prctl only asks for a permission; it reads and writes no memory.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// `a · B` for `rows` rows of `a` (`pairs` bf16 pairs per row, `rows` a multiple of
/// [`TILE_ROWS`]) and `B` packed as [`super::PackedBf16`]'s data (`pairs` per strip, `n`
/// columns in whole strips): `rows x padded_width(n)` float32, `epilogue` applied to each
/// block as it is stored. Call only where [`takes`]`(pairs)`.
pub(crate) fn product(
    data: &[u16],
    pairs: usize,
    a: &[u32],
    rows: usize,
    n: usize,
    epilogue: Epilogue,
) -> Vec<f32> {
    epilogue.assert_width(n);
    let strips = padded_width(n) / STRIP;
    assert!(takes(pairs), "AMX product over {pairs} pairs");
    assert!(rows.is_multiple_of(TILE_ROWS) && a.len() >= rows * pairs);
    assert!(data.len() >= strips * pairs * STRIP * 2);
    let stride = strips * STRIP;
    let mut out = Vec::with_capacity(rows * stride);
    let writes = DisjointWrites::uninit(out.spare_capacity_mut());
    // Blocks of two row tiles (four sum tiles sharing each loaded tile twice), one of one tile
    // for an odd count. A task takes a block across several strips under one tile
    // configuration: with short `k` (a 384-wide layer is 12 tile steps), configuring,
    // releasing and handing out a task per strip cost as much as the products.
    let blocks = rows.div_ceil(2 * TILE_ROWS);
    let group = strips_per_task(blocks, strips, rayon::current_num_threads());
    let groups = strips.div_ceil(group);
    (0..blocks * groups).into_par_iter().for_each(|task| {
        let (block, first_strip) = (task / groups, (task % groups) * group);
        let first = block * 2 * TILE_ROWS;
        let two = first + 2 * TILE_ROWS <= rows;
        let a = a[first * pairs..].as_ptr();
        // SAFETY: `takes` held (AMX usable, whole tile steps); the block's rows lie inside `a`
        // and the output, and its columns of the group's strips belong to this task alone.
        unsafe {
            let tiles = x86::Tiles::configure();
            for strip in first_strip..(first_strip + group).min(strips) {
                let b = &data[strip * pairs * STRIP * 2..][..pairs * STRIP * 2];
                let at = writes.at(first * stride + strip * STRIP);
                if two {
                    tiles.block::<2>(a, pairs, b.as_ptr(), at, stride);
                } else {
                    tiles.block::<1>(a, pairs, b.as_ptr(), at, stride);
                }
                let block_rows = if two { 2 * TILE_ROWS } else { TILE_ROWS };
                epilogue.apply(at, block_rows, stride, strip_columns(strip, n));
            }
        }
    });
    // SAFETY: the blocks cover every row of every strip, each writing its whole 32 columns.
    unsafe { out.set_len(rows * stride) };
    out
}

/// Strips per task: as many as keep every thread about four tasks to take.
fn strips_per_task(blocks: usize, strips: usize, threads: usize) -> usize {
    let tasks_wanted = 4 * threads.max(1);
    let groups = tasks_wanted.div_ceil(blocks).clamp(1, strips.max(1));
    (strips / groups).max(1)
}

mod x86 {
    use std::arch::asm;
    use std::marker::PhantomData;

    use super::{TILE_PAIRS, TILE_ROWS};

    /// `ldtilecfg`'s operand: palette 1, and each of the eight tiles 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    const CONFIG: TileConfig = {
        let mut bytes = [0u8; 64];
        bytes[0] = 1;
        let mut tile = 0;
        while tile < 8 {
            bytes[16 + 2 * tile] = 64; // bytes per row
            bytes[48 + tile] = TILE_ROWS as u8;
            tile += 1;
        }
        TileConfig(bytes)
    };

    /// This thread's tile registers, configured for [`Tiles::block`] until dropped (released).
    /// The configuration lives in the CPU's tile state, which no compiled code touches, so it
    /// holds from one asm block to the next on the same thread.
    pub(super) struct Tiles(PhantomData<*const ()>);

    impl Tiles {
        /// # Safety
        /// AMX must be usable ([`super::available`]); the value must stay on this thread.
        pub(super) unsafe fn configure() -> Self {
            // SAFETY: per the caller; ldtilecfg reads the 64-byte configuration only.
            unsafe {
                asm!("ldtilecfg [{cfg}]", cfg = in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
            }
            Tiles(PhantomData)
        }

        /// `ROW_TILES x 16` rows by 32 columns of `a · B`, written at `out` (row stride `stride`
        /// floats). Sum tiles tmm0-tmm3 (row tile, column half), left tiles tmm4-tmm5, right
        /// tiles tmm6-tmm7. The loop over `k` is inside one asm block: tile registers are not
        /// something the compiler keeps between blocks.
        ///
        /// # Safety
        /// `a` must hold `ROW_TILES x 16` rows of `pairs` u32 (row stride `pairs`), `b` one
        /// packed strip of `pairs` pairs (128 bytes per pair), `out` be valid for the rows' 32
        /// floats; `pairs` a non-zero multiple of 16.
        pub(super) unsafe fn block<const ROW_TILES: usize>(
            &self,
            a: *const u32,
            pairs: usize,
            b: *const u16,
            out: *mut f32,
            stride: usize,
        ) {
            let steps = pairs / TILE_PAIRS;
            let a_stride = pairs * 4;
            let b_stride = 128usize;
            let out_stride = stride * 4;
            // SAFETY (both arms): the tiles are configured (`self`); per the caller, every
            // address is a tile row inside `a`, `b` or `out` (16 rows from the tile's start at
            // its stride, 64 bytes each), and the asm touches no other memory nor the stack.
            unsafe {
                if ROW_TILES == 2 {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        "2:",
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm5, [{a1} + {sa}*1]",
                        "tileloadd tmm6, [{b} + {sb}*1]",
                        "tileloadd tmm7, [{b} + {sb}*1 + 64]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        "add {a0}, 64",
                        "add {a1}, 64",
                        "add {b}, 2048",
                        "dec {steps}",
                        "jnz 2b",
                        "tilestored [{c0} + {sc}*1], tmm0",
                        "tilestored [{c0} + {sc}*1 + 64], tmm1",
                        "tilestored [{c1} + {sc}*1], tmm2",
                        "tilestored [{c1} + {sc}*1 + 64], tmm3",
                        a0 = inout(reg) a => _,
                        a1 = inout(reg) a.add(TILE_ROWS * pairs) => _,
                        b = inout(reg) b => _,
                        steps = inout(reg) steps => _,
                        sa = in(reg) a_stride,
                        sb = in(reg) b_stride,
                        c0 = in(reg) out,
                        c1 = in(reg) out.add(TILE_ROWS * stride),
                        sc = in(reg) out_stride,
                        options(nostack),
                    );
                } else {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "2:",
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm6, [{b} + {sb}*1]",
                        "tileloadd tmm7, [{b} + {sb}*1 + 64]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "add {a0}, 64",
                        "add {b}, 2048",
                        "dec {steps}",
                        "jnz 2b",
                        "tilestored [{c0} + {sc}*1], tmm0",
                        "tilestored [{c0} + {sc}*1 + 64], tmm1",
                        a0 = inout(reg) a => _,
                        b = inout(reg) b => _,
                        steps = inout(reg) steps => _,
                        sa = in(reg) a_stride,
                        sb = in(reg) b_stride,
                        c0 = in(reg) out,
                        sc = in(reg) out_stride,
                        options(nostack),
                    );
                }
            }
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: releasing the tile state touches no memory; the tiles were configured.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::strips_per_task;

    #[test]
    fn tasks_cover_every_strip_and_keep_threads_busy() {
        for (blocks, strips, threads) in
            [(6, 36, 2), (6, 12, 2), (1, 12, 2), (1, 1, 2), (40, 48, 16)]
        {
            let group = strips_per_task(blocks, strips, threads);
            assert!(group >= 1 && group <= strips);
            let tasks = blocks * strips.div_ceil(group);
            // Enough tasks for four per thread wherever there are that many block-strips.
            assert!(
                tasks >= (4 * threads).min(blocks * strips),
                "{blocks} {strips} {threads}"
            );
        }
        assert_eq!(strips_per_task(6, 36, 2), 18);
        assert_eq!(strips_per_task(1, 12, 2), 1);
        assert_eq!(strips_per_task(40, 48, 2), 48);
    }
}
