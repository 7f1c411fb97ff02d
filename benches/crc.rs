//! Guard-checksum throughput, one core, per protection interval: guardblk's SIMD CRCs against
//! ISA-L (the speed anchor, linked here only — never in the daemon) and the `crc` crate's table
//! implementation; and memcpy against guardblk's fused copy + guard.
//!
//!     cargo bench --bench crc [-- --seconds S]
//!
//! Bookworm's ISA-L (2.30) has no CRC-64/NVME (crc64_rocksoft came later), so the 64-bit row
//! is anchored on ISA-L's crc64_ecma_refl: the same reflected 64-bit folding, another polynomial.
//!
//! Rows, each at 512 B and 4 KiB intervals over a 64 KiB (L2-resident) buffer:
//! - generate: compute each interval's guard;
//! - verify: compute it and compare with a stored guard (as a read would);
//! - copy: memcpy of each interval to a destination buffer (the anchor for target 2), the
//!   same copy as one 64 KiB memcpy (reference), guardblk's fused copy+guard per interval,
//!   and copy-then-guard in two passes (reference).

use std::hint::black_box;
use std::time::{Duration, Instant};

use guardblk::integrity::guard::{
    copy_crc16_t10dif, copy_crc64_nvme, copy_with_guards, crc16_t10dif, crc64_nvme,
};

#[link(name = "isal")]
extern "C" {
    #[link_name = "crc16_t10dif"]
    fn isal_crc16_t10dif(init: u16, buf: *const u8, len: u64) -> u16;
    #[link_name = "crc64_ecma_refl"]
    fn isal_crc64_ecma_refl(init: u64, buf: *const u8, len: u64) -> u64;
}

fn isal16(b: &[u8]) -> u16 {
    // SAFETY: ISA-L reads exactly `len` bytes from `buf`, which the slice provides.
    unsafe { isal_crc16_t10dif(0, b.as_ptr(), b.len() as u64) }
}

fn isal64(b: &[u8]) -> u64 {
    // SAFETY: as above.
    unsafe { isal_crc64_ecma_refl(0, b.as_ptr(), b.len() as u64) }
}

const CRC16_TABLE: crc::Crc<u16, crc::Table<16>> =
    crc::Crc::<u16, crc::Table<16>>::new(&crc::CRC_16_T10_DIF);
const CRC64_TABLE: crc::Crc<u64, crc::Table<16>> =
    crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_NVME);

/// GB/s of `f` applied to every interval of a 64 KiB (L2-resident) buffer, best of 5 slices.
fn rate(seconds: f64, buf: &[u8], interval: usize, mut f: impl FnMut(&[u8])) -> f64 {
    let slice = Duration::from_secs_f64(seconds / 5.0);
    let mut best = 0.0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let mut bytes = 0u64;
        while start.elapsed() < slice {
            for chunk in buf.chunks_exact(interval) {
                f(black_box(chunk));
            }
            bytes += buf.len() as u64;
        }
        best = best.max(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Offset of `chunk` inside `buf`.
fn offset(buf: &[u8], chunk: &[u8]) -> usize {
    chunk.as_ptr() as usize - buf.as_ptr() as usize
}

/// GB/s of verifying every interval: compute its guard with `g`, compare with the stored one.
fn verify<G: PartialEq>(seconds: f64, buf: &[u8], n: usize, g: impl Fn(&[u8]) -> G) -> f64 {
    let want: Vec<G> = buf.chunks_exact(n).map(&g).collect();
    let mut bad = 0u64;
    let r = rate(seconds, buf, n, |c| {
        bad += (g(c) != want[offset(buf, c) / n]) as u64;
    });
    assert_eq!(black_box(bad), 0, "verify found a mismatch");
    r
}

fn main() {
    let mut seconds = 1.0;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--seconds") {
        seconds = args[i + 1].parse().expect("--seconds takes a number");
    }
    // Source and destination page-aligned, as guest pages and bounce buffers are (a
    // destination 16 bytes past a 4 KiB multiple from the source would add 4K-aliasing
    // stalls to every copy loop; `--dst-skew N` offsets the destination by N bytes to see it).
    let mut src_mem = vec![0u8; 65536 + 4096];
    let at = src_mem.as_ptr().align_offset(4096);
    let buf = &mut src_mem[at..at + 65536];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = ((i as u32).wrapping_mul(2654435761) >> 13) as u8;
    }
    let buf: &[u8] = buf;
    assert_eq!(
        isal16(&buf[..4096]),
        crc16_t10dif(&buf[..4096]),
        "ISA-L and guardblk disagree on CRC-16/T10-DIF"
    );
    assert_eq!(
        CRC64_TABLE.checksum(&buf[..4096]),
        crc64_nvme(&buf[..4096]),
        "crc crate and guardblk disagree on CRC-64/NVME"
    );

    println!("one core, 64 KiB buffer, best of 5 slices, {seconds} s per cell; GB/s");
    println!("{:<38} {:>9} {:>9}", "", "512 B", "4 KiB");
    let row = |name: &str, f: &mut dyn FnMut(usize) -> f64| {
        let (a, b) = (f(512), f(4096));
        println!("{name:<38} {a:>9.2} {b:>9.2}");
        (a, b)
    };
    println!("-- generate");
    let g16 = row("guardblk crc16 t10dif", &mut |n| {
        rate(seconds, buf, n, |c| {
            black_box(crc16_t10dif(c));
        })
    });
    let i16 = row("ISA-L crc16_t10dif", &mut |n| {
        rate(seconds, buf, n, |c| {
            black_box(isal16(c));
        })
    });
    row("crc crate crc16, slice-16 (reference)", &mut |n| {
        rate(seconds, buf, n, |c| {
            black_box(CRC16_TABLE.checksum(c));
        })
    });
    let g64 = row("guardblk crc64 nvme", &mut |n| {
        rate(seconds, buf, n, |c| {
            black_box(crc64_nvme(c));
        })
    });
    let i64_ = row("ISA-L crc64_ecma_refl (anchor)", &mut |n| {
        rate(seconds, buf, n, |c| {
            black_box(isal64(c));
        })
    });
    row("crc crate crc64 nvme, slice-16", &mut |n| {
        rate(seconds, buf, n, |c| {
            black_box(CRC64_TABLE.checksum(c));
        })
    });

    println!("-- verify (compute + compare with stored guard)");
    let v16 = row("guardblk crc16 verify", &mut |n| {
        verify(seconds, buf, n, crc16_t10dif)
    });
    let vi16 = row("ISA-L crc16 verify", &mut |n| {
        verify(seconds, buf, n, isal16)
    });
    let v64 = row("guardblk crc64 verify", &mut |n| {
        verify(seconds, buf, n, crc64_nvme)
    });
    let vi64 = row("ISA-L crc64_ecma_refl verify", &mut |n| {
        verify(seconds, buf, n, isal64)
    });

    println!("-- copy (src -> dst, per interval unless noted)");
    let skew: usize = args.iter().position(|a| a == "--dst-skew").map_or(0, |i| {
        args[i + 1].parse().expect("--dst-skew takes a number")
    });
    let mut dst_mem = vec![0u8; 65536 + 8192];
    let at = dst_mem.as_ptr().align_offset(4096) + skew % 4096;
    let dst = &mut dst_mem[at..at + 65536];
    let memcpy = row("memcpy per interval (anchor)", &mut |n| {
        rate(seconds, buf, n, |c| {
            let o = offset(buf, c);
            dst[o..o + n].copy_from_slice(c);
            black_box(&mut *dst);
        })
    });
    row("memcpy, whole 64 KiB (reference)", &mut |_| {
        rate(seconds, buf, buf.len(), |c| {
            dst.copy_from_slice(c);
            black_box(&mut *dst);
        })
    });
    let fused16 = row("guardblk fused copy + crc16", &mut |n| {
        rate(seconds, buf, n, |c| {
            let o = offset(buf, c);
            black_box(copy_crc16_t10dif(&mut dst[o..o + n], c));
        })
    });
    let fused64 = row("guardblk fused copy + crc64", &mut |n| {
        rate(seconds, buf, n, |c| {
            let o = offset(buf, c);
            black_box(copy_crc64_nvme(&mut dst[o..o + n], c));
        })
    });
    let mut guards16 = Vec::with_capacity(buf.len() / 512);
    row("copy, then crc16 (two passes, ref.)", &mut |n| {
        rate(seconds, buf, buf.len(), |src| {
            guards16.clear();
            copy_with_guards(dst, src, n, crc16_t10dif, &mut guards16);
        })
    });

    println!();
    println!("ratios (target: >= 0.90)                512 B     4 KiB");
    let ratio = |name: &str, a: (f64, f64), b: (f64, f64)| {
        let r = (a.0 / b.0, a.1 / b.1);
        println!("{name:<38} {:>9.2} {:>9.2}", r.0, r.1);
        r
    };
    let r = [
        (
            "crc16 generate vs ISA-L",
            ratio("crc16 generate / ISA-L", g16, i16),
        ),
        (
            "crc64 generate vs ISA-L anchor",
            ratio("crc64 generate / ISA-L anchor", g64, i64_),
        ),
        (
            "crc16 verify vs ISA-L",
            ratio("crc16 verify / ISA-L verify", v16, vi16),
        ),
        (
            "crc64 verify vs ISA-L anchor",
            ratio("crc64 verify / ISA-L anchor verify", v64, vi64),
        ),
        (
            "fused copy+crc16 vs memcpy",
            ratio("copy+crc16 / memcpy", fused16, memcpy),
        ),
        (
            "fused copy+crc64 vs memcpy",
            ratio("copy+crc64 / memcpy", fused64, memcpy),
        ),
    ];
    println!();
    for (name, (a, b)) in r {
        let verdict = |x: f64| if x >= 0.9 { "met" } else { "NOT met" };
        println!(
            "target {name:<32} 512 B: {} ({a:.2})   4 KiB: {} ({b:.2})",
            verdict(a),
            verdict(b)
        );
    }
}
