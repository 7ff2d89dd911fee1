//! A durable on-disk queue: the telemetry forwarder's spool between MQTT and InfluxDB
//! (nothing is acknowledged to the broker before it is here, nothing leaves before
//! InfluxDB has acknowledged it), and the calibration bridge's queue of records waiting
//! for a database that is down.
//!
//! Layout (like vector's disk buffer, simpler): a directory of append-only segment files
//! `<id>.seg` holding records `[len u32 LE][crc32 u32 LE][payload]`, and a `cursor` file
//! with the position of the first record not yet delivered. Segments wholly before the
//! cursor are deleted. On open, a torn record at the end of the newest segment (a crash
//! mid-write) is cut off; a record whose checksum fails is skipped and counted.
//! Delivery is at-least-once: a crash between delivery and the cursor write repeats the
//! last batch.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const HEADER: u64 = 8;
/// Largest record accepted (a bigger length on disk means corruption).
pub const MAX_RECORD: u64 = 16 * 1024 * 1024;

/// What to do when the spool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Delete the oldest segment (its undelivered records are lost, counted and logged).
    DropOldest,
    /// Refuse new records: the caller stops acknowledging MQTT, so the broker keeps them.
    Refuse,
}

/// Spool settings.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Directory of the segment files.
    pub dir: PathBuf,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
    /// Bound on all segments together.
    pub max_bytes: u64,
    /// Policy at the bound.
    pub overflow: Overflow,
}

/// A position in the spool: segment id and byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    /// Segment id.
    pub segment: u64,
    /// Offset in the segment.
    pub offset: u64,
}

/// Errors from the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Disk trouble.
    #[error("spool I/O: {0}")]
    Io(#[from] io::Error),
    /// Full, and the policy is to refuse.
    #[error("spool full ({0} bytes)")]
    Full(u64),
    /// A record larger than [`MAX_RECORD`].
    #[error("record of {0} bytes is larger than the spool accepts")]
    TooLarge(u64),
}

/// Counters for the service's self-metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Undelivered records deleted by the drop-oldest policy.
    pub dropped: u64,
    /// Records skipped because their checksum or length was wrong.
    pub corrupt: u64,
}

/// The spool.
pub struct Spool {
    cfg: SpoolConfig,
    segments: VecDeque<(u64, u64)>,
    head: BufWriter<File>,
    cursor: Position,
    /// Counters.
    pub stats: SpoolStats,
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

impl Spool {
    /// Opens (or creates) the spool in `cfg.dir`, recovering from a crash.
    pub fn open(cfg: SpoolConfig) -> Result<Spool, SpoolError> {
        fs::create_dir_all(&cfg.dir)?;
        let mut ids: Vec<u64> = fs::read_dir(&cfg.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
            .collect();
        ids.sort_unstable();
        if ids.is_empty() {
            ids.push(0);
            File::create(seg_path(&cfg.dir, 0))?;
        }
        let mut stats = SpoolStats::default();
        let newest = *ids.last().unwrap_or(&0);
        // Cut a torn record off the newest segment.
        let valid = scan(&seg_path(&cfg.dir, newest), 0, u64::MAX, &mut |_| {})?;
        let head_file = OpenOptions::new()
            .append(true)
            .open(seg_path(&cfg.dir, newest))?;
        if head_file.metadata()?.len() > valid.offset_end {
            tracing::warn!(
                segment = newest,
                kept = valid.offset_end,
                "spool: cutting a torn record left by a crash"
            );
            head_file.set_len(valid.offset_end)?;
            stats.corrupt += 1;
        }
        let mut segments = VecDeque::new();
        for id in &ids {
            segments.push_back((*id, fs::metadata(seg_path(&cfg.dir, *id))?.len()));
        }
        let cursor = match read_cursor(&cfg.dir) {
            Some(c) if ids.contains(&c.segment) => c,
            Some(c) if ids.first().is_some_and(|f| *f > c.segment) => Position {
                segment: ids[0],
                offset: 0,
            },
            Some(_) | None => {
                if cfg.dir.join("cursor").exists() {
                    tracing::warn!(
                        "spool: cursor unreadable; delivering from the oldest record again"
                    );
                }
                Position {
                    segment: ids[0],
                    offset: 0,
                }
            }
        };
        Ok(Spool {
            cfg,
            segments,
            head: BufWriter::new(head_file),
            cursor,
            stats,
        })
    }

    /// Bytes on disk, delivered records of the oldest segment included.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|(_, len)| len).sum()
    }

    /// Bytes of records not yet delivered.
    pub fn pending_bytes(&self) -> u64 {
        self.segments
            .iter()
            .filter(|(id, _)| *id >= self.cursor.segment)
            .map(|(id, len)| {
                if *id == self.cursor.segment {
                    len.saturating_sub(self.cursor.offset)
                } else {
                    *len
                }
            })
            .sum()
    }

    /// Whether every record has been delivered.
    pub fn is_empty(&self) -> bool {
        self.pending_bytes() == 0
    }

    /// Appends a record. Durable only after [`Spool::sync`].
    pub fn append(&mut self, payload: &[u8]) -> Result<(), SpoolError> {
        let size = payload.len() as u64 + HEADER;
        if payload.len() as u64 > MAX_RECORD || size > self.cfg.max_bytes {
            return Err(SpoolError::TooLarge(payload.len() as u64));
        }
        while self.bytes() + size > self.cfg.max_bytes {
            match self.cfg.overflow {
                Overflow::Refuse => return Err(SpoolError::Full(self.bytes())),
                Overflow::DropOldest => {
                    if self.segments.len() < 2 {
                        // Only the head is left: start a new one so the old can go.
                        self.roll()?;
                    }
                    self.drop_oldest()?;
                }
            }
        }
        let crc = crc32fast::hash(payload);
        self.head.write_all(&(payload.len() as u32).to_le_bytes())?;
        self.head.write_all(&crc.to_le_bytes())?;
        self.head.write_all(payload)?;
        if let Some(last) = self.segments.back_mut() {
            last.1 += size;
            if last.1 >= self.cfg.segment_bytes {
                self.roll()?;
            }
        }
        Ok(())
    }

    /// Hands what was appended to the kernel: after this, a crash of the process loses
    /// none of it (a power cut still may; see [`Spool::sync`]).
    pub fn flush(&mut self) -> Result<(), SpoolError> {
        self.head.flush()?;
        Ok(())
    }

    /// Flushes like [`Spool::flush`] and returns a handle on the segment being written,
    /// so that another thread can fsync it without holding the spool (older segments
    /// were fsynced when they were closed).
    pub fn sync_handle(&mut self) -> Result<File, SpoolError> {
        self.head.flush()?;
        Ok(self.head.get_ref().try_clone()?)
    }

    /// Flushes and fsyncs what was appended: after this, a crash loses none of it.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        self.head.flush()?;
        self.head.get_ref().sync_data()?;
        Ok(())
    }

    fn roll(&mut self) -> Result<(), SpoolError> {
        self.sync()?;
        let id = self.segments.back().map_or(0, |(id, _)| id + 1);
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(seg_path(&self.cfg.dir, id))?;
        self.head = BufWriter::new(f);
        self.segments.push_back((id, 0));
        Ok(())
    }

    fn drop_oldest(&mut self) -> Result<(), SpoolError> {
        let Some((id, _)) = self.segments.pop_front() else {
            return Ok(());
        };
        if self.cursor.segment <= id {
            let mut lost = 0;
            let from = if self.cursor.segment == id {
                self.cursor.offset
            } else {
                0
            };
            scan(&seg_path(&self.cfg.dir, id), from, u64::MAX, &mut |_| {
                lost += 1
            })?;
            self.stats.dropped += lost;
            tracing::error!(
                segment = id,
                records = lost,
                "spool full: oldest undelivered records dropped"
            );
            let next = self.segments.front().map_or(id + 1, |(n, _)| *n);
            self.cursor = Position {
                segment: next,
                offset: 0,
            };
            write_cursor(&self.cfg.dir, self.cursor)?;
        }
        fs::remove_file(seg_path(&self.cfg.dir, id))?;
        Ok(())
    }

    /// Reads up to `max_records` undelivered records (and about `max_bytes`), returning
    /// them with the position to [`Spool::ack`] once they are delivered.
    pub fn read(
        &mut self,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<(Vec<Vec<u8>>, Position), SpoolError> {
        self.head.flush()?;
        let mut out = Vec::new();
        let mut pos = self.cursor;
        let mut bytes = 0u64;
        for &(id, _) in self
            .segments
            .iter()
            .filter(|(id, _)| *id >= self.cursor.segment)
        {
            let from = if id == pos.segment { pos.offset } else { 0 };
            let left = max_records - out.len();
            let r = scan(
                &seg_path(&self.cfg.dir, id),
                from,
                left as u64,
                &mut |rec| {
                    bytes += rec.len() as u64;
                    out.push(rec);
                },
            )?;
            self.stats.corrupt += r.corrupt;
            pos = Position {
                segment: id,
                offset: r.offset_end,
            };
            if out.len() >= max_records || bytes >= max_bytes {
                break;
            }
            if r.stopped_early {
                // The rest of this segment is unreadable: move on to the next one.
                tracing::error!(
                    segment = id,
                    offset = r.offset_end,
                    "spool: unreadable data skipped"
                );
                continue;
            }
        }
        Ok((out, pos))
    }

    /// Marks everything before `to` delivered, durably, and deletes finished segments.
    pub fn ack(&mut self, to: Position) -> Result<(), SpoolError> {
        if to <= self.cursor {
            return Ok(());
        }
        self.cursor = to;
        write_cursor(&self.cfg.dir, to)?;
        while self.segments.len() > 1
            && self
                .segments
                .front()
                .is_some_and(|(id, _)| *id < to.segment)
        {
            if let Some((id, _)) = self.segments.pop_front() {
                fs::remove_file(seg_path(&self.cfg.dir, id))?;
            }
        }
        Ok(())
    }
}

struct Scan {
    offset_end: u64,
    corrupt: u64,
    stopped_early: bool,
}

/// The undelivered records of the spool in `dir`, oldest first, each given to `each`,
/// read-only: for a reader beside the process that owns the spool (`dcs run show` while
/// the bridge runs). Nothing is changed: no cursor moved, no torn tail cut (a record
/// being written is not given). Segments the owner deletes meanwhile were delivered.
pub fn pending_records(dir: &Path, each: &mut dyn FnMut(Vec<u8>)) -> Result<(), SpoolError> {
    // The cursor first: a segment listed before a cursor that moved on is skipped, never
    // one listed after.
    let cursor = read_cursor(dir).unwrap_or_default();
    let mut ids: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
        .collect();
    ids.sort_unstable();
    for id in ids.into_iter().filter(|id| *id >= cursor.segment) {
        let from = if id == cursor.segment {
            cursor.offset
        } else {
            0
        };
        match scan(&seg_path(dir, id), from, u64::MAX, each) {
            Ok(_) => {}
            // Deleted (delivered) or cut short (a torn tail trimmed by the owner's
            // restart) while being read: what was read stands.
            Err(SpoolError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::UnexpectedEof
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads records of one segment from `from`, at most `max` of them, calling `each`.
/// Stops at the end, at a torn record, or at a length that cannot be right.
fn scan(
    path: &Path,
    from: u64,
    max: u64,
    each: &mut dyn FnMut(Vec<u8>),
) -> Result<Scan, SpoolError> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(from))?;
    let mut r = io::BufReader::new(f);
    let mut off = from;
    let (mut n, mut corrupt) = (0u64, 0u64);
    while n < max && off + HEADER <= len {
        let mut h = [0u8; 8];
        r.read_exact(&mut h)?;
        let size = u64::from(u32::from_le_bytes([h[0], h[1], h[2], h[3]]));
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        if size > MAX_RECORD || off + HEADER + size > len {
            return Ok(Scan {
                offset_end: off,
                corrupt: corrupt + 1,
                stopped_early: true,
            });
        }
        let mut payload = vec![0u8; size as usize];
        r.read_exact(&mut payload)?;
        off += HEADER + size;
        if crc32fast::hash(&payload) == crc {
            each(payload);
            n += 1;
        } else {
            corrupt += 1;
            tracing::error!(path = %path.display(), offset = off - HEADER - size, "spool: record with a bad checksum skipped");
        }
    }
    Ok(Scan {
        offset_end: off,
        corrupt,
        stopped_early: off + HEADER <= len && n < max,
    })
}

fn read_cursor(dir: &Path) -> Option<Position> {
    let text = fs::read_to_string(dir.join("cursor")).ok()?;
    let (s, o) = text.trim().split_once(' ')?;
    Some(Position {
        segment: s.parse().ok()?,
        offset: o.parse().ok()?,
    })
}

fn write_cursor(dir: &Path, p: Position) -> io::Result<()> {
    let tmp = dir.join("cursor.tmp");
    let mut f = File::create(&tmp)?;
    writeln!(f, "{} {}", p.segment, p.offset)?;
    f.sync_data()?;
    fs::rename(&tmp, dir.join("cursor"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path, segment_bytes: u64, max_bytes: u64, overflow: Overflow) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_path_buf(),
            segment_bytes,
            max_bytes,
            overflow,
        }
    }

    fn rec(i: usize) -> Vec<u8> {
        format!("record-{i:04}").into_bytes()
    }

    fn drain(s: &mut Spool) -> Vec<Vec<u8>> {
        let mut all = Vec::new();
        loop {
            let (batch, pos) = s.read(7, u64::MAX).unwrap();
            if batch.is_empty() {
                return all;
            }
            all.extend(batch);
            s.ack(pos).unwrap();
        }
    }

    #[test]
    fn round_trip_across_segments_and_restarts() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(cfg(d.path(), 100, 1 << 20, Overflow::Refuse)).unwrap();
        for i in 0..50 {
            s.append(&rec(i)).unwrap();
        }
        s.sync().unwrap();
        // Deliver 20, then "crash" (drop without anything else) and reopen.
        let (batch, pos) = s.read(20, u64::MAX).unwrap();
        assert_eq!(batch, (0..20).map(rec).collect::<Vec<_>>());
        s.ack(pos).unwrap();
        drop(s);
        let mut s = Spool::open(cfg(d.path(), 100, 1 << 20, Overflow::Refuse)).unwrap();
        assert_eq!(drain(&mut s), (20..50).map(rec).collect::<Vec<_>>());
        assert!(s.is_empty());
        // Finished segments are deleted.
        let files = fs::read_dir(d.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "seg")
            })
            .count();
        assert!(files <= 2, "{files} segment files left");
    }

    #[test]
    fn unacked_batch_is_delivered_again() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(cfg(d.path(), 1 << 20, 1 << 20, Overflow::Refuse)).unwrap();
        for i in 0..3 {
            s.append(&rec(i)).unwrap();
        }
        s.sync().unwrap();
        let (first, _) = s.read(10, u64::MAX).unwrap();
        drop(s); // InfluxDB never acknowledged
        let mut s = Spool::open(cfg(d.path(), 1 << 20, 1 << 20, Overflow::Refuse)).unwrap();
        assert_eq!(drain(&mut s), first);
    }

    #[test]
    fn torn_tail_is_cut_and_appending_goes_on() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(cfg(d.path(), 1 << 20, 1 << 20, Overflow::Refuse)).unwrap();
        for i in 0..3 {
            s.append(&rec(i)).unwrap();
        }
        s.sync().unwrap();
        drop(s);
        let seg = seg_path(d.path(), 0);
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let mut s = Spool::open(cfg(d.path(), 1 << 20, 1 << 20, Overflow::Refuse)).unwrap();
        assert_eq!(s.stats.corrupt, 1);
        s.append(&rec(9)).unwrap();
        assert_eq!(drain(&mut s), vec![rec(0), rec(1), rec(9)]);
    }

    #[test]
    fn bad_checksum_skips_one_record() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(cfg(d.path(), 1 << 20, 1 << 20, Overflow::Refuse)).unwrap();
        for i in 0..3 {
            s.append(&rec(i)).unwrap();
        }
        s.sync().unwrap();
        let seg = seg_path(d.path(), 0);
        let mut bytes = fs::read(&seg).unwrap();
        let second_payload = (HEADER as usize + rec(0).len()) + HEADER as usize + 2;
        bytes[second_payload] ^= 0xff;
        fs::write(&seg, bytes).unwrap();
        assert_eq!(drain(&mut s), vec![rec(0), rec(2)]);
        assert_eq!(s.stats.corrupt, 1);
    }

    #[test]
    fn overflow_policies() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(cfg(d.path(), 100, 300, Overflow::Refuse)).unwrap();
        let mut refused = None;
        for i in 0..100 {
            if let Err(e) = s.append(&rec(i)) {
                refused = Some((i, e));
                break;
            }
        }
        let (n, e) = refused.expect("refused when full");
        assert!(matches!(e, SpoolError::Full(_)), "{e}");
        assert_eq!(
            drain(&mut s),
            (0..n).map(rec).collect::<Vec<_>>(),
            "nothing lost before the refusal"
        );

        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(cfg(d.path(), 100, 300, Overflow::DropOldest)).unwrap();
        for i in 0..100 {
            s.append(&rec(i)).unwrap();
        }
        assert!(s.bytes() <= 300);
        let kept = drain(&mut s);
        assert_eq!(kept.last(), Some(&rec(99)), "newest kept");
        assert_eq!(
            s.stats.dropped as usize + kept.len(),
            100,
            "every record delivered or counted as dropped"
        );
    }

    #[test]
    fn garbage_cursor_means_redelivery_not_loss() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(cfg(d.path(), 1 << 20, 1 << 20, Overflow::Refuse)).unwrap();
        s.append(&rec(1)).unwrap();
        s.sync().unwrap();
        drop(s);
        fs::write(d.path().join("cursor"), "not a cursor").unwrap();
        let mut s = Spool::open(cfg(d.path(), 1 << 20, 1 << 20, Overflow::Refuse)).unwrap();
        assert_eq!(drain(&mut s), vec![rec(1)]);
    }

    #[test]
    fn pending_records_are_read_without_touching_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SpoolConfig {
            dir: dir.path().to_path_buf(),
            segment_bytes: 64,
            max_bytes: 1 << 20,
            overflow: Overflow::Refuse,
        };
        let mut s = Spool::open(cfg).unwrap();
        for i in 0..10u8 {
            s.append(&[i; 20]).unwrap();
        }
        s.flush().unwrap();
        let (first, to) = s.read(3, u64::MAX).unwrap();
        assert_eq!(first.len(), 3);
        s.ack(to).unwrap();
        let before = s.pending_bytes();
        let mut got = Vec::new();
        pending_records(dir.path(), &mut |r| got.push(r)).unwrap();
        assert_eq!(got, (3..10u8).map(|i| vec![i; 20]).collect::<Vec<_>>());
        assert_eq!(s.pending_bytes(), before, "nothing consumed");
        let (next, _) = s.read(1, u64::MAX).unwrap();
        assert_eq!(next, [vec![3u8; 20]]);
    }
}
