//! The PI side of an image as tests see it from outside: metadata layout and tuples, raw
//! reads and writes behind the daemon's back, guard-error log lines, the journal, scrub.

use super::*;

/// `IMAGE.pi`.
pub fn meta_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".pi");
    PathBuf::from(name)
}

/// `IMAGE.pi-journal.jsonl`.
pub fn journal_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".pi-journal.jsonl");
    PathBuf::from(name)
}

/// Where an image's tuples are, read from its metadata header (docs/FORMAT.md: little-endian
/// fields; format code at byte 32, tuple size at 33, interval at 36, blocks at 40,
/// tuples_offset at 80).
#[derive(Debug, Clone, Copy)]
pub struct PiLayout {
    /// 1, 3 or 64.
    pub format: u8,
    pub tuple_size: u64,
    pub interval: u64,
    pub blocks: u64,
    pub tuples_offset: u64,
}

impl PiLayout {
    pub fn read(image: &Path) -> PiLayout {
        let header = pread(&meta_path(image), 0, 4096);
        assert_eq!(&header[..8], b"GBLK-PI\0", "not PI metadata");
        let u32_at = |o: usize| u32::from_le_bytes(header[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().unwrap());
        PiLayout {
            format: header[32],
            tuple_size: u64::from(header[33]),
            interval: u64::from(u32_at(36)),
            blocks: u64_at(40),
            tuples_offset: u64_at(80),
        }
    }

    /// Byte offset of `lba`'s tuple in the metadata file.
    pub fn tuple_offset(&self, lba: u64) -> u64 {
        self.tuples_offset + lba * self.tuple_size
    }

    /// Byte range of the reference tag within a tuple (big-endian).
    pub fn ref_range(&self) -> std::ops::Range<usize> {
        if self.tuple_size == 16 {
            10..16
        } else {
            4..8
        }
    }

    /// The guard of `data` in this format.
    pub fn guard_of(&self, data: &[u8]) -> u64 {
        if self.format == 64 {
            crc::Crc::<u64>::new(&crc::CRC_64_NVME).checksum(data)
        } else {
            u64::from(crc::Crc::<u16>::new(&crc::CRC_16_T10_DIF).checksum(data))
        }
    }

    /// (guard, app, ref) of a raw big-endian tuple.
    pub fn decode(&self, raw: &[u8]) -> (u64, u16, u64) {
        if self.tuple_size == 16 {
            let mut r = [0u8; 8];
            r[2..].copy_from_slice(&raw[10..16]);
            (
                u64::from_be_bytes(raw[0..8].try_into().unwrap()),
                u16::from_be_bytes([raw[8], raw[9]]),
                u64::from_be_bytes(r),
            )
        } else {
            (
                u64::from(u16::from_be_bytes([raw[0], raw[1]])),
                u16::from_be_bytes([raw[2], raw[3]]),
                u64::from(u32::from_be_bytes(raw[4..8].try_into().unwrap())),
            )
        }
    }

    pub fn read_tuple(&self, image: &Path, lba: u64) -> Vec<u8> {
        pread(
            &meta_path(image),
            self.tuple_offset(lba),
            self.tuple_size as usize,
        )
    }

    /// Overwrite `lba`'s tuple through the page cache (the daemon maps the file shared, so
    /// it sees the change at once).
    pub fn write_tuple(&self, image: &Path, lba: u64, raw: &[u8]) {
        assert_eq!(raw.len() as u64, self.tuple_size);
        pwrite_sync(&meta_path(image), self.tuple_offset(lba), raw);
    }

    pub fn read_block(&self, image: &Path, lba: u64) -> Vec<u8> {
        pread(image, lba * self.interval, self.interval as usize)
    }

    pub fn write_block(&self, image: &Path, lba: u64, data: &[u8]) {
        assert_eq!(data.len() as u64, self.interval);
        pwrite_sync(image, lba * self.interval, data);
    }
}

pub fn pread(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// Buffered write plus fdatasync: the daemon's O_DIRECT reads see it (the kernel writes back
/// and invalidates cached pages of a range before direct I/O to it, and we synced anyway).
pub fn pwrite_sync(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_data().unwrap();
}

/// A field of a `tracing` log line (`name=value`, value unquoted).
pub fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let pat = format!(" {name}=");
    let start = line.find(&pat)? + pat.len();
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

/// One `PI guard error` line of the daemon's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardErrorLine {
    pub lba: u64,
    pub byte_offset: u64,
    pub kind: String,
    pub expected: String,
    pub actual: String,
    pub request: String,
}

pub fn guard_error_lines(log: &str) -> Vec<GuardErrorLine> {
    log.lines()
        .filter(|l| l.contains("PI guard error"))
        .map(|l| {
            let field = |n| {
                log_field(l, n)
                    .unwrap_or_else(|| panic!("no {n}= in {l:?}"))
                    .to_string()
            };
            GuardErrorLine {
                lba: field("lba").parse().unwrap(),
                byte_offset: field("byte_offset").parse().unwrap(),
                kind: field("kind"),
                expected: field("expected"),
                actual: field("actual"),
                request: field("request"),
            }
        })
        .collect()
}

/// Every parsable record of the image's error journal.
pub fn journal_records(image: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(journal_path(image))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("journal line {l:?}: {e}")))
        .collect()
}

/// What `guardblk scrub IMAGE --json` said.
#[derive(Debug)]
pub struct ScrubOutcome {
    pub code: Option<i32>,
    /// The per-error objects (everything but the summary).
    pub errors: Vec<serde_json::Value>,
    pub summary: Option<serde_json::Value>,
    pub stdout: String,
    pub stderr: String,
}

impl ScrubOutcome {
    /// (lba, kind) of every reported error, sorted.
    pub fn lbas_and_kinds(&self) -> Vec<(u64, String)> {
        let mut v: Vec<(u64, String)> = self
            .errors
            .iter()
            .map(|e| {
                (
                    e["lba"].as_u64().unwrap_or_else(|| panic!("no lba in {e}")),
                    e["kind"].as_str().unwrap_or("?").to_string(),
                )
            })
            .collect();
        v.sort();
        v
    }

    pub fn summary_u64(&self, name: &str) -> Option<u64> {
        self.summary.as_ref()?.get(name)?.as_u64()
    }
}

impl std::fmt::Display for ScrubOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "scrub exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Run `guardblk scrub IMAGE --json` (the daemon must be stopped: scrub takes the lock).
pub fn scrub_json(image: &Path) -> ScrubOutcome {
    let out = Command::new(BIN)
        .args(["scrub", image.to_str().unwrap(), "--json"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let mut errors = Vec::new();
    let mut summary = None;
    for line in stdout.lines().filter(|l| l.trim_start().starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("scrub printed a line that is not JSON ({e}): {line:?}"));
        match v.get("summary") {
            Some(s) => summary = Some(s.clone()),
            None => errors.push(v),
        }
    }
    ScrubOutcome {
        code: out.status.code(),
        errors,
        summary,
        stdout,
        stderr,
    }
}

/// Scrub must find the image clean: exit 0, no error objects, a summary saying 0 errors.
pub fn assert_scrub_clean(image: &Path, context: &str) -> ScrubOutcome {
    let s = scrub_json(image);
    assert_eq!(s.code, Some(0), "{context}: scrub not clean: {s}");
    assert!(s.errors.is_empty(), "{context}: scrub reported errors: {s}");
    assert_eq!(
        s.summary_u64("errors"),
        Some(0),
        "{context}: scrub summary: {s}"
    );
    s
}

// ---------------------------------------------------------------------------------------------
// Randomness and self-describing block content for race and crash tests.
// ---------------------------------------------------------------------------------------------
