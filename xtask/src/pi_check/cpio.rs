//! A minimal writer of the initramfs format: an uncompressed cpio archive in the
//! "newc" layout (the Linux kernel's `Documentation/driver-api/early-userspace/
//! buffer-format.rst`): directories, regular files and symlinks, owned by root.

use std::io::{self, Write};

/// Mode bits of the entry types we write.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// Writes entries in the order given; [`Cpio::finish`] writes the trailer.
pub struct Cpio<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> Cpio<W> {
    pub fn new(out: W) -> Self {
        Cpio { out, written: 0, next_ino: 1 }
    }

    /// A directory (parents must come first).
    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | mode, 2, &[])
    }

    /// A regular file with `data`.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | mode, 1, data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, target.as_bytes())
    }

    /// The trailer entry, then flush; returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, 1, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, path: &str, mode: u32, nlink: u32, data: &[u8]) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        let namesize = name.len() + 1;
        let size = u32::try_from(data.len()).map_err(|_| io::Error::other(format!("{name}: larger than 4 GiB")))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize, check: 8 hex digits each.
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 0, 0, 0, 0, 0, 0
        );
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

    /// Pad to a multiple of 4 bytes, as newc requires after the name and the data.
    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0; 3][..pad])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_newc_with_padded_names_and_data_and_a_trailer() {
        let mut c = Cpio::new(Vec::new());
        c.dir("/bin", 0o755).unwrap();
        c.file("/init", 0o755, b"#!/bin/sh\n").unwrap();
        let out = c.finish().unwrap();
        let text = String::from_utf8_lossy(&out);
        // Header (110 bytes) + "bin\0" = 114 -> padded to 116.
        assert!(text.starts_with("070701"));
        assert_eq!(&out[110..114], b"bin\0");
        assert_eq!(&text[116..122], "070701");
        assert!(text.contains("#!/bin/sh\n"));
        assert!(text.contains("TRAILER!!!"));
        assert_eq!(out.len() % 4, 0);
        // mode of /init: regular file 0755.
        assert_eq!(&text[116 + 14..116 + 22], "000081ed");
    }
}
