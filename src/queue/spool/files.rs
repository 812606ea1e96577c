//! The spool directory: which files are segments, renumbering segments
//! whose numbers cannot be followed, and the `corrupt/` directory where
//! damaged or unusable files are kept instead of being deleted (as Postfix
//! keeps damaged queue files in its `corrupt` queue).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use super::format::{SEGMENT_PREFIX, SEGMENT_SUFFIX};

/// Where damaged segments and unusable segment-like files are moved.
pub(super) const CORRUPT_DIR: &str = "corrupt";

/// Segment numbers above this were not reached by counting up from 1 (that
/// would take 2^63 new segments); such a number came from outside.
pub(super) const RENUMBER_ABOVE: u64 = u64::MAX / 2;

pub(super) fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(segment_name(seq))
}

fn segment_name(seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{seq:016}{SEGMENT_SUFFIX}")
}

/// The segments of a spool directory.
#[derive(Debug, Default)]
pub(super) struct Listing {
    /// Segment numbers, ascending.
    pub segments: Vec<u64>,
    /// Files named like segments that cannot be used as one, and why.
    pub unusable: Vec<(PathBuf, &'static str)>,
}

pub(super) fn list(dir: &Path) -> io::Result<Listing> {
    let mut out = Listing::default();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(number) = name
            .strip_prefix(SEGMENT_PREFIX)
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
        else {
            continue;
        };
        let why = match number.parse::<u64>() {
            // The name is checked whole: the writer only ever makes this
            // form, and a file is opened by the name its number gives.
            Ok(seq) if segment_name(seq) == name => {
                if entry.file_type()?.is_file() {
                    out.segments.push(seq);
                    continue;
                }
                "not a regular file"
            }
            Ok(_) => "not a name the spool writes (16-digit number)",
            Err(_) => "its number is not a segment number",
        };
        out.unusable.push((entry.path(), why));
    }
    out.segments.sort_unstable();
    Ok(out)
}

/// Files already kept in `corrupt/`, by name.
pub(super) fn quarantined(dir: &Path) -> Vec<PathBuf> {
    let corrupt = dir.join(CORRUPT_DIR);
    let Ok(entries) = fs::read_dir(&corrupt) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| corrupt.join(e.file_name().to_string_lossy().as_ref()))
        .collect();
    out.sort();
    out
}

/// Creates `corrupt/` ahead of need (a full disk may refuse it later).
pub(super) fn make_corrupt_dir(dir: &Path) -> io::Result<()> {
    let corrupt = dir.join(CORRUPT_DIR);
    if !corrupt.is_dir() {
        fs::create_dir(&corrupt)?;
        sync_dir(dir)?;
    }
    Ok(())
}

/// Moves `path` into `corrupt/` under a name not taken there; returns the
/// new path.
pub(super) fn quarantine(dir: &Path, path: &Path, why: &str) -> io::Result<PathBuf> {
    make_corrupt_dir(dir)?;
    let corrupt = dir.join(CORRUPT_DIR);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unnamed".into());
    let mut target = corrupt.join(&name);
    let mut n = 1;
    while target.symlink_metadata().is_ok() {
        target = corrupt.join(format!("{name}.{n}"));
        n += 1;
    }
    fs::rename(path, &target)?;
    sync_dir(&corrupt)?;
    sync_dir(dir)?;
    tracing::error!(file = %path.display(), kept_as = %target.display(), reason = why, "spool file moved to corrupt/ for inspection");
    Ok(target)
}

/// Gives the segments the numbers `base..base+n` in their order, when the
/// highest one is past [`RENUMBER_ABOVE`]: the head segment must get a
/// number above every other, and counting on from there would overflow.
/// Renumbering keeps every record and the replay order (the order of the
/// numbers), and runs before replay, so no body location refers to an old
/// number. Each step renames one segment to a lower number that no segment
/// holds, in ascending order: after a crash at any step the numbers on disk
/// are still in the original order, and the next start finishes the job.
pub(super) fn renumber_if_needed(dir: &Path, segments: &mut [u64]) -> io::Result<()> {
    if segments.last().is_none_or(|&s| s <= RENUMBER_ABOVE) {
        return Ok(());
    }
    // From 1 as the writer counts, or from 0 when a segment 0 exists (the
    // i-th segment's number is never below its new one, so no rename
    // lands on a segment not yet renamed).
    let base = segments[0].min(1);
    tracing::warn!(
        highest = segments[segments.len() - 1],
        segments = segments.len(),
        "spool segment numbers too high to count on from: renumbering them from {base} in order"
    );
    for (i, seq) in segments.iter_mut().enumerate() {
        let new = base + i as u64;
        if *seq == new {
            continue;
        }
        let to = segment_path(dir, new);
        if to.symlink_metadata().is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "cannot renumber spool segment {seq}: {} exists",
                    to.display()
                ),
            ));
        }
        fs::rename(segment_path(dir, *seq), &to)?;
        // One rename durable before the next: the order argument above
        // holds only if renames reach the disk in the order made.
        sync_dir(dir)?;
        tracing::info!(from = *seq, to = new, "spool segment renumbered");
        *seq = new;
    }
    Ok(())
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
