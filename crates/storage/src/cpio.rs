//! A writer for the cpio "newc" format, the one the kernel unpacks initramfs archives from.
//! Entries carry uid/gid 0 and mtime 0, so an archive depends only on its contents.

use std::io::{self, Read, Write};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const TRAILER: &str = "TRAILER!!!";

pub(crate) struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    pub(crate) fn new(out: W) -> Self {
        Self::at_offset(out, 0)
    }

    /// A writer whose output continues a file already `offset` bytes long (for appending an
    /// archive: the kernel aligns entries relative to the start of the whole initramfs).
    pub(crate) fn at_offset(out: W, offset: u64) -> Self {
        Self {
            out,
            written: offset,
            next_ino: 1,
        }
    }

    pub(crate) fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | perm, 2, (0, 0), b"")
    }

    pub(crate) fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, 1, (0, 0), data)
    }

    pub(crate) fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    pub(crate) fn char_dev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        self.entry(name, S_IFCHR | perm, 1, (major, minor), b"")
    }

    /// Writes the trailer and returns the underlying writer.
    #[cfg(test)]
    pub(crate) fn finish(self) -> io::Result<W> {
        self.finish_aligned(4)
    }

    /// Writes the trailer, then zeros up to a multiple of `align` bytes (the kernel skips
    /// zeros between and after archives), and returns the underlying writer.
    pub(crate) fn finish_aligned(mut self, align: u64) -> io::Result<W> {
        self.next_ino = 0;
        self.entry(TRAILER, 0, 1, (0, 0), b"")?;
        let pad = (align - self.written % align) % align;
        io::copy(&mut io::repeat(0).take(pad), &mut self.out)?;
        self.written += pad;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry over 4 GiB"))?;
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio name too long"))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = ((4 - self.written % 4) % 4) as usize;
        self.put(&[0u8; 3][..n])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_padded_and_terminated() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/nook-agent", 0o755, b"hello").unwrap();
        let out = w.finish().unwrap();
        // header(110) + "nook-agent\0"(11) = 121 -> pad to 124, data 5 -> pad to 132.
        assert_eq!(&out[..6], b"070701");
        let field = |entry: usize, i: usize| {
            let at = entry + 6 + i * 8;
            u32::from_str_radix(std::str::from_utf8(&out[at..at + 8]).unwrap(), 16).unwrap()
        };
        assert_eq!(field(0, 1), 0o100755);
        assert_eq!(field(0, 6), 5);
        assert_eq!(field(0, 11), 11);
        assert_eq!(&out[110..121], b"nook-agent\0");
        assert_eq!(&out[124..129], b"hello");
        assert_eq!(&out[132..138], b"070701");
        assert_eq!(&out[132 + 110..132 + 121], b"TRAILER!!!\0");
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn appended_archives_align_to_the_whole_file() {
        let mut w = CpioWriter::at_offset(Vec::new(), 4096);
        w.file("a", 0o644, b"xyz").unwrap();
        let out = w.finish_aligned(4096).unwrap();
        assert_eq!(out.len() % 4096, 0);
        assert_eq!(&out[116..122], b"070701"); // trailer right after the entry
        assert!(out[240..].iter().all(|&b| b == 0));
    }

    #[test]
    fn cpio_tool_lists_what_we_wrote() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/busybox", 0o755, b"x").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let out = w.finish().unwrap();
        crate::require_tool("cpio", "cpio");
        let mut child = std::process::Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&out).unwrap();
        let listing = child.wait_with_output().unwrap();
        assert!(listing.status.success());
        assert_eq!(
            String::from_utf8(listing.stdout).unwrap(),
            "bin\nbin/busybox\nbin/sh\ndev/console\n"
        );
    }
}
