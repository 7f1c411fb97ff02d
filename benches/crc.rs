//! Guard-checksum throughput, one core, per protection interval: guardblk's SIMD CRCs against
//! ISA-L (the speed anchor, linked here only — never in the daemon) and the `crc` crate's table
//! implementation; and memcpy against guardblk's fused copy + guard.
//!
//!     cargo bench --bench crc [-- --seconds S]
//!
//! Bookworm's ISA-L (2.30) has no CRC-64/NVME (crc64_rocksoft came later), so the 64-bit row
//! is anchored on ISA-L's crc64_ecma_refl: the same reflected 64-bit folding, another polynomial.

use std::hint::black_box;
use std::time::{Duration, Instant};

use guardblk::integrity::guard::{copy_with_guards, crc16_t10dif, crc64_nvme};

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

fn main() {
    let mut seconds = 1.0;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--seconds") {
        seconds = args[i + 1].parse().expect("--seconds takes a number");
    }
    let buf: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert_eq!(
        isal16(&buf[..4096]),
        crc16_t10dif(&buf[..4096]),
        "ISA-L and guardblk disagree on CRC-16/T10-DIF"
    );

    println!("one core, 64 KiB buffer, best of 5 slices, {seconds} s per cell; GB/s");
    println!("{:<34} {:>9} {:>9}", "", "512 B", "4 KiB");
    let row = |name: &str, f: &dyn Fn(usize) -> f64| {
        let (a, b) = (f(512), f(4096));
        println!("{name:<34} {a:>9.2} {b:>9.2}");
        (a, b)
    };
    let g16 = row("guardblk crc16 t10dif (crc-fast)", &|n| {
        rate(seconds, &buf, n, |c| {
            black_box(crc16_t10dif(c));
        })
    });
    let i16 = row("ISA-L crc16_t10dif", &|n| {
        rate(seconds, &buf, n, |c| {
            black_box(isal16(c));
        })
    });
    row("crc crate, slice-16 (reference)", &|n| {
        rate(seconds, &buf, n, |c| {
            black_box(CRC16_TABLE.checksum(c));
        })
    });
    let g64 = row("guardblk crc64 nvme (crc-fast)", &|n| {
        rate(seconds, &buf, n, |c| {
            black_box(crc64_nvme(c));
        })
    });
    let i64_ = row("ISA-L crc64_ecma_refl (anchor)", &|n| {
        rate(seconds, &buf, n, |c| {
            black_box(isal64(c));
        })
    });
    row("crc crate crc64 nvme, slice-16", &|n| {
        rate(seconds, &buf, n, |c| {
            black_box(CRC64_TABLE.checksum(c));
        })
    });

    let mut dst = vec![0u8; buf.len()];
    let mut copy_rate = |n: usize, fused: Option<bool>| {
        let mut guards16 = Vec::with_capacity(buf.len() / 512);
        let mut guards64 = Vec::with_capacity(buf.len() / 512);
        rate(seconds, &buf, buf.len(), |src| match fused {
            None => dst.copy_from_slice(src),
            Some(false) => {
                guards16.clear();
                copy_with_guards(&mut dst, src, n, crc16_t10dif, &mut guards16);
            }
            Some(true) => {
                guards64.clear();
                copy_with_guards(&mut dst, src, n, crc64_nvme, &mut guards64);
            }
        })
    };
    let memcpy = (copy_rate(512, None), copy_rate(4096, None));
    println!("{:<34} {:>9.2} {:>9.2}", "memcpy", memcpy.0, memcpy.1);
    let fused16 = (copy_rate(512, Some(false)), copy_rate(4096, Some(false)));
    println!(
        "{:<34} {:>9.2} {:>9.2}",
        "copy + crc16 guards (per interval)", fused16.0, fused16.1
    );
    let fused64 = (copy_rate(512, Some(true)), copy_rate(4096, Some(true)));
    println!(
        "{:<34} {:>9.2} {:>9.2}",
        "copy + crc64 guards (per interval)", fused64.0, fused64.1
    );

    println!();
    println!("ratios (target: >= 0.90)           512 B     4 KiB");
    println!(
        "crc16 guardblk / ISA-L          {:>9.2} {:>9.2}",
        g16.0 / i16.0,
        g16.1 / i16.1
    );
    println!(
        "crc64 guardblk / ISA-L anchor   {:>9.2} {:>9.2}",
        g64.0 / i64_.0,
        g64.1 / i64_.1
    );
    println!(
        "copy+crc16 / memcpy             {:>9.2} {:>9.2}",
        fused16.0 / memcpy.0,
        fused16.1 / memcpy.1
    );
    println!(
        "copy+crc64 / memcpy             {:>9.2} {:>9.2}",
        fused64.0 / memcpy.0,
        fused64.1 / memcpy.1
    );
}
