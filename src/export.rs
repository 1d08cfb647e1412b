//! The served file: positioned reads and writes, hole punching, zeroing, extents and syncing.
//! Everything here is blocking and is called from the disk workers, except `try_read_nowait`,
//! which the reactor may call because it never waits for the disk.

use crate::error::Error;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Zero-filled whole blocks of this size are punched rather than written.
pub const ZERO_BLOCK: u64 = 4096;

pub struct Export {
    file: File,
    size: u64,
    read_only: bool,
    /// Cleared once the filesystem says it cannot punch holes, so we stop asking.
    can_punch: AtomicBool,
    can_zero_range: AtomicBool,
    /// Cleared when the kernel rejects RWF_NOWAIT, so reads go straight to the pool.
    can_nowait: AtomicBool,
    /// Cleared when the kernel has no cachestat(2) (before 6.5), so nothing is sent with
    /// sendfile: without it we cannot know that sendfile will not wait for the disk.
    can_cachestat: AtomicBool,
    /// The page size cachestat counts in.
    page: u64,
}

/// cachestat(2): the same number on every architecture (added after the syscall tables were
/// unified); the libc crate does not name it for x86_64.
const SYS_CACHESTAT: libc::c_long = 451;

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// One base:allocation extent: (length, NBD state bits).
pub type Extent = (u32, u32);

impl Export {
    pub fn open(path: &Path, read_only: bool) -> Result<Export, Error> {
        let ctx = |e: io::Error| Error::File { path: path.to_path_buf(), source: e };
        let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(ctx)?;
        Export::from_file(file, path, read_only)
    }

    /// Serves an already open file (`path` is only for messages).
    pub fn from_file(file: File, path: &Path, read_only: bool) -> Result<Export, Error> {
        let ctx = |e: io::Error| Error::File { path: path.to_path_buf(), source: e };
        let meta = file.metadata().map_err(ctx)?;
        let ft = meta.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(Error::NotAFile(path.to_path_buf()));
        }
        // lseek(SEEK_END) gives the size of block devices too, where metadata says 0.
        let size = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
        if size < 0 {
            return Err(ctx(io::Error::last_os_error()));
        }
        Ok(Export {
            file,
            size: size as u64,
            read_only,
            can_punch: AtomicBool::new(true),
            can_zero_range: AtomicBool::new(true),
            can_nowait: AtomicBool::new(true),
            can_cachestat: AtomicBool::new(true),
            // SAFETY: sysconf has no preconditions.
            page: u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(512),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether RWF_NOWAIT reads work here (so a failed one means "not cached").
    pub fn nowait_reads(&self) -> bool {
        self.can_nowait.load(Ordering::Relaxed)
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Device and inode of the open file, to tell whether a path still names it.
    pub fn identity(&self) -> io::Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata()?;
        Ok((m.dev(), m.ino()))
    }

    /// The file, for sendfile.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Whether every page of the range is in the page cache, so that sendfile from it will not
    /// wait for the disk. False when the kernel cannot tell (no cachestat).
    pub fn cached(&self, off: u64, len: usize) -> bool {
        if len == 0 || !self.can_cachestat.load(Ordering::Relaxed) {
            return false;
        }
        let range = CachestatRange { off, len: len as u64 };
        let mut st = Cachestat::default();
        // SAFETY: cachestat reads `range` and fills `st`, both live for the call.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                self.fd(),
                &range as *const CachestatRange,
                &mut st as *mut Cachestat,
                0,
            )
        };
        if r != 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                self.can_cachestat.store(false, Ordering::Relaxed);
            }
            return false;
        }
        let first = off / self.page;
        let last = off.saturating_add(len as u64 - 1) / self.page;
        let pages = last - first + 1;
        st.nr_cache >= pages
    }

    /// Fills `buf` from `off`; a short read means the file shrank under us, which is an I/O error.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }

    /// Reads from the page cache without waiting for the disk: `None` when any of it would block.
    pub fn try_read_nowait(&self, buf: &mut [u8], off: u64) -> Option<io::Result<()>> {
        if !self.can_nowait.load(Ordering::Relaxed) || buf.is_empty() {
            return None;
        }
        let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: iov points into `buf`, which outlives the call.
        let n = unsafe { libc::preadv2(self.fd(), &iov, 1, off as i64, libc::RWF_NOWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => return None,
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                    self.can_nowait.store(false, Ordering::Relaxed);
                    return None;
                }
                _ => return Some(Err(e)),
            }
        }
        // A partial answer means part of the range is not cached: let a worker do it all.
        if n as usize == buf.len() { Some(Ok(())) } else { None }
    }

    /// Writes `data` at `off`, punching whole zero blocks instead of writing them.
    pub fn write_at(&self, data: &[u8], off: u64, fua: bool) -> io::Result<()> {
        for (start, end, zero) in segments(data, off) {
            let seg = &data[start..end];
            if zero {
                self.punch_or_zero(off + start as u64, seg.len() as u64)?;
            } else {
                self.file.write_all_at(seg, off + start as u64)?;
            }
        }
        if fua { self.flush() } else { Ok(()) }
    }

    pub fn trim(&self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        // Trim is advisory: a filesystem that cannot punch simply keeps the data.
        if self.can_punch.load(Ordering::Relaxed) {
            match self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len) {
                Err(e) if unsupported(&e) => self.can_punch.store(false, Ordering::Relaxed),
                r => r?,
            }
        }
        if fua { self.flush() } else { Ok(()) }
    }

    /// Zeroes a range: punch (or ZERO_RANGE with `no_hole`), falling back to writing zeros
    /// unless `fast` asks us to fail instead of doing it slowly.
    pub fn write_zeroes(&self, off: u64, len: u64, no_hole: bool, fast: bool, fua: bool) -> io::Result<()> {
        let done = if no_hole {
            self.try_fallocate(
                &self.can_zero_range,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )?
        } else {
            self.try_fallocate(
                &self.can_punch,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )? || self.try_fallocate(
                &self.can_zero_range,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )?
        };
        if !done {
            if fast {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            self.write_zero_bytes(off, len)?;
        }
        if fua { self.flush() } else { Ok(()) }
    }

    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub fn cache(&self, off: u64, len: u64) -> io::Result<()> {
        // SAFETY: plain syscall on our own fd.
        let r = unsafe { libc::posix_fadvise(self.fd(), off as i64, len as i64, libc::POSIX_FADV_WILLNEED) };
        if r == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(r)) }
    }

    /// base:allocation extents covering [off, off+len), at most `max` of them (the last one may
    /// stop short of the end of the range, as the spec allows).
    pub fn extents(&self, off: u64, len: u32, max: usize) -> io::Result<Vec<Extent>> {
        let end = off + u64::from(len);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = off;
        while pos < end && out.len() < max {
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(d) => d.min(end),
                // ENXIO: no data at or after pos.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                // No SEEK_DATA support: everything is data.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    out.push(((end - pos) as u32, 0));
                    break;
                }
                Err(e) => return Err(e),
            };
            if data > pos {
                out.push(((data - pos) as u32, crate::proto::STATE_HOLE | crate::proto::STATE_ZERO));
                pos = data;
                continue;
            }
            let hole = match self.seek(pos, libc::SEEK_HOLE) {
                Ok(h) => h.min(end),
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                Err(e) => return Err(e),
            };
            // A hole at pos right after SEEK_DATA said data: the file changed; report data.
            let hole = if hole <= pos { end } else { hole };
            out.push(((hole - pos) as u32, 0));
            pos = hole;
        }
        Ok(out)
    }

    /// The first offset in [off, end) that may hold data (`end` if none). Unlike `extents` it
    /// never looks for the end of the data: on tmpfs SEEK_HOLE walks every page up to the next
    /// hole, so on a dense file each call would cost time proportional to the rest of the file.
    pub fn data_from(&self, off: u64, end: u64) -> io::Result<u64> {
        match self.seek(off, libc::SEEK_DATA) {
            Ok(d) => Ok(d.clamp(off, end)),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(end),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(off),
            Err(e) => Err(e),
        }
    }

    fn seek(&self, off: u64, whence: i32) -> io::Result<u64> {
        // SAFETY: lseek on our fd; workers share the fd but SEEK_DATA/HOLE results are returned,
        // and every read/write is positioned, so the shared file offset is never relied on.
        let r = unsafe { libc::lseek(self.fd(), off as i64, whence) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as u64) }
    }

    fn fallocate(&self, mode: i32, off: u64, len: u64) -> io::Result<()> {
        // The kernel answers a zero length with EINVAL, which would read as "this filesystem
        // cannot" and switch punching off for good.
        if len == 0 {
            return Ok(());
        }
        // SAFETY: plain syscall on our own fd.
        let r = unsafe { libc::fallocate(self.fd(), mode, off as i64, len as i64) };
        if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    /// Ok(true) when done, Ok(false) when this filesystem cannot (remembered in `flag`).
    fn try_fallocate(&self, flag: &AtomicBool, mode: i32, off: u64, len: u64) -> io::Result<bool> {
        if !flag.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match self.fallocate(mode, off, len) {
            Ok(()) => Ok(true),
            Err(e) if unsupported(&e) => {
                flag.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn punch_or_zero(&self, off: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if !self.try_fallocate(&self.can_punch, mode, off, len)? {
            self.write_zero_bytes(off, len)?;
        }
        Ok(())
    }

    fn write_zero_bytes(&self, mut off: u64, len: u64) -> io::Result<()> {
        static ZEROS: [u8; 65536] = [0; 65536];
        let end = off + len;
        while off < end {
            let n = (end - off).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], off)?;
            off += n as u64;
        }
        Ok(())
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL))
}

/// True when every byte is zero; ORs wide words so the compiler can vectorise it.
pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

/// Splits a write at `off` into maximal runs (start, end, all_zero) of `data`: whole
/// ZERO_BLOCK-aligned zero blocks are "zero"; everything else (including unaligned edges) is data.
pub fn segments(data: &[u8], off: u64) -> Vec<(usize, usize, bool)> {
    let len = data.len();
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    let mut push = |s: usize, e: usize, z: bool| {
        if s == e {
            return;
        }
        match out.last_mut() {
            Some(last) if last.2 == z && last.1 == s => last.1 = e,
            _ => out.push((s, e, z)),
        }
    };
    let head = ((ZERO_BLOCK - off % ZERO_BLOCK) % ZERO_BLOCK).min(len as u64) as usize;
    push(0, head, false);
    let mut pos = head;
    while pos + ZERO_BLOCK as usize <= len {
        let e = pos + ZERO_BLOCK as usize;
        push(pos, e, is_zero(&data[pos..e]));
        pos = e;
    }
    push(pos, len, false);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 4096]));
        let mut b = vec![0u8; 4096];
        b[4095] = 1;
        assert!(!is_zero(&b));
        b[4095] = 0;
        b[3] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&[]));
    }

    #[test]
    fn segments_split_aligned_zero_blocks() {
        let mut d = vec![0u8; 4 * 4096];
        d[4096] = 7;
        assert_eq!(segments(&d, 0), vec![(0, 4096, true), (4096, 8192, false), (8192, 16384, true)]);
        // Unaligned start: the head up to the boundary is always written.
        let d = vec![0u8; 8192];
        assert_eq!(segments(&d, 100), vec![(0, 3996, false), (3996, 8092, true), (8092, 8192, false)]);
        assert_eq!(segments(&[0u8; 10], 0), vec![(0, 10, false)]);
        assert_eq!(segments(&[], 0), vec![]);
    }
}
