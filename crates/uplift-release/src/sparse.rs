//! Reading an image that may be sparse. Filesystem images are mostly holes
//! until filled, and asking the kernel for a hole's bytes makes it zero
//! page-cache pages for every one of them: building a release from a
//! 16 GiB sparse image spent three quarters of its time there. The
//! file's extents are asked for instead (`SEEK_DATA` and `SEEK_HOLE`), and
//! a hole's zeros come from memory.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::FileExt as _;

/// What is known of the bytes from the reader's position on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extent {
    /// Not asked yet.
    Unknown,
    /// Data up to this offset.
    DataUntil(u64),
    /// A hole up to this offset.
    HoleUntil(u64),
    /// The file does not tell its holes (not a regular file, or a
    /// filesystem without the calls): read it through to its end.
    Plain,
}

/// A [`Read`] over a file that gives a hole's zeros without reading them;
/// the bytes are the same as reading the file through.
#[derive(Debug)]
pub struct SparseReader<'a> {
    file: &'a File,
    position: u64,
    /// The file's size when opened; a regular file is read up to it.
    len: u64,
    extent: Extent,
}

impl<'a> SparseReader<'a> {
    pub fn new(file: &'a File) -> io::Result<Self> {
        let meta = file.metadata()?;
        let extent = if meta.is_file() {
            Extent::Unknown
        } else {
            Extent::Plain
        };
        Ok(Self {
            file,
            position: 0,
            len: meta.len(),
            extent,
        })
    }

    /// Where the extent holding the position ends, and whether it is a hole.
    fn locate(&mut self) -> io::Result<Extent> {
        use nix::unistd::{lseek, Whence};
        let fd = self.file.as_raw_fd();
        let at = i64::try_from(self.position).map_err(io::Error::other)?;
        let extent = match lseek(fd, at, Whence::SeekData) {
            // No data after the position: a hole to the end.
            Err(nix::errno::Errno::ENXIO) => Extent::HoleUntil(self.len),
            Err(nix::errno::Errno::EINVAL) => return self.read_through(),
            Err(e) => return Err(e.into()),
            Ok(data) if data > at => Extent::HoleUntil(data as u64),
            Ok(_) => match lseek(fd, at, Whence::SeekHole) {
                Ok(hole) => Extent::DataUntil((hole as u64).min(self.len)),
                Err(nix::errno::Errno::EINVAL) => return self.read_through(),
                Err(e) => return Err(e.into()),
            },
        };
        Ok(extent)
    }

    /// Goes on reading sequentially from the position.
    fn read_through(&mut self) -> io::Result<Extent> {
        io::Seek::seek(&mut &*self.file, io::SeekFrom::Start(self.position))?;
        Ok(Extent::Plain)
    }
}

impl Read for SparseReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let room = buf.len() as u64;
            let n = match self.extent {
                Extent::Plain => (&mut &*self.file).read(buf)?,
                _ if self.position >= self.len || buf.is_empty() => return Ok(0),
                Extent::DataUntil(end) if self.position < end => {
                    let want = (end - self.position).min(room) as usize;
                    self.file.read_at(&mut buf[..want], self.position)?
                }
                Extent::HoleUntil(end) if self.position < end => {
                    let want = (end - self.position).min(room) as usize;
                    buf[..want].fill(0);
                    want
                }
                Extent::Unknown | Extent::DataUntil(_) | Extent::HoleUntil(_) => {
                    self.extent = self.locate()?;
                    continue;
                }
            };
            self.position += n as u64;
            return Ok(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(file: &File) -> Vec<u8> {
        let mut out = Vec::new();
        let mut reader = SparseReader::new(file).unwrap();
        // Odd-sized reads, so they straddle extents.
        let mut buf = vec![0u8; 12_345];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    fn sparse_file(len: u64, islands: &[(u64, &[u8])]) -> (tempfile::NamedTempFile, Vec<u8>) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(len).unwrap();
        let mut expected = vec![0u8; len as usize];
        for (at, bytes) in islands {
            tmp.as_file().write_all_at(bytes, *at).unwrap();
            expected[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
        }
        (tmp, expected)
    }

    #[test]
    fn a_sparse_file_reads_as_its_bytes() {
        let island: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8 | 1).collect();
        let len = 4 << 20;
        let (tmp, expected) = sparse_file(
            len,
            &[(0, &island[..100]), (1 << 20, &island), (len - 5, b"tail!")],
        );
        assert_eq!(read_all(tmp.as_file()), expected);
    }

    #[test]
    fn holes_at_both_ends_and_a_file_of_only_hole() {
        let (tmp, expected) = sparse_file(3 << 20, &[(1 << 20, b"middle")]);
        assert_eq!(read_all(tmp.as_file()), expected);
        let (tmp, expected) = sparse_file(1 << 20, &[]);
        assert_eq!(read_all(tmp.as_file()), expected);
        let (tmp, expected) = sparse_file(0, &[]);
        assert_eq!(read_all(tmp.as_file()), expected);
    }

    #[test]
    fn a_file_that_is_not_regular_is_read_through() {
        // A pipe tells no extents, no size and no offsets: read to its end.
        let (rx, mut tx) = std::io::pipe().unwrap();
        let writer = std::thread::spawn(move || {
            std::io::Write::write_all(&mut tx, &[7u8; 100_000]).unwrap();
        });
        let file = File::from(std::os::fd::OwnedFd::from(rx));
        assert_eq!(read_all(&file), vec![7u8; 100_000]);
        writer.join().unwrap();
    }
}
