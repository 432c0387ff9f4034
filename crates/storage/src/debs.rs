//! Debian packages fetched with `apt-get download` into a cache, and unpacked with `dpkg-deb`.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::StorageError;
use crate::cmd;
use crate::error::io_err;

/// One line of `apt-get download --print-uris`: `'URL' FILE SIZE SHA256:HEX`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Uri {
    pub file: String,
    pub size: u64,
    pub sha256: Option<String>,
}

pub(crate) fn parse_print_uris(text: &str) -> Option<Uri> {
    let line = text.lines().find(|l| l.starts_with('\''))?;
    let mut words = line.split_whitespace().skip(1);
    let file = words.next()?.to_string();
    let size = words.next()?.parse().ok()?;
    let sha256 = words
        .next()
        .and_then(|h| h.strip_prefix("SHA256:"))
        .map(|h| h.to_ascii_lowercase());
    Some(Uri { file, size, sha256 })
}

/// The package named first in a `Depends:` field.
pub(crate) fn first_dependency(depends: &str) -> Option<&str> {
    let first = depends.split([',', '|']).next()?.trim();
    let name = first.split([' ', '(', ':']).next()?.trim();
    (!name.is_empty()).then_some(name)
}

fn sha256_file(path: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

fn is_cached(path: &Path, uri: &Uri) -> bool {
    match fs::metadata(path) {
        Ok(m) if m.len() == uri.size => match &uri.sha256 {
            Some(want) => sha256_file(path).is_ok_and(|got| &got == want),
            None => true,
        },
        _ => false,
    }
}

/// The current candidate `.deb` of `package`, from `cache` or downloaded into it.
pub(crate) fn fetch(
    package: &str,
    cache: &Path,
    note: &mut dyn FnMut(&str),
) -> Result<PathBuf, StorageError> {
    fs::create_dir_all(cache).map_err(io_err("create", cache))?;
    // `--print-uris` prints nothing for a package already in its working directory, so ask
    // from an empty one.
    let query_dir = cache.join(".query");
    fs::create_dir_all(&query_dir).map_err(io_err("create", &query_dir))?;
    let apt = |args: &[&str], dir: &Path| -> Result<Vec<u8>, StorageError> {
        cmd::output(
            Command::new("apt-get").args(args).current_dir(dir),
            "apt",
            cache,
        )
        .map_err(|e| match e {
            StorageError::ToolFailed { tail, .. } if tail.contains("Unable to locate package") => {
                StorageError::PackageNotFound(package.to_string())
            }
            other => other,
        })
    };
    let listing = apt(&["download", "--print-uris", package], &query_dir)?;
    let uri = parse_print_uris(&String::from_utf8_lossy(&listing))
        .ok_or_else(|| StorageError::PackageNotFound(package.to_string()))?;
    let path = cache.join(&uri.file);
    if is_cached(&path, &uri) {
        note(&format!("{} (cached)", uri.file));
        return Ok(path);
    }
    note(&format!(
        "downloading {} ({} KiB)",
        uri.file,
        uri.size / 1024
    ));
    apt(&["download", package], cache)?;
    if !is_cached(&path, &uri) {
        let _ = fs::remove_file(&path);
        return Err(StorageError::Build(format!(
            "{} was not downloaded intact: try again",
            uri.file
        )));
    }
    Ok(path)
}

/// A control field of a `.deb` (`dpkg-deb -f`).
pub(crate) fn field(deb: &Path, name: &str) -> Result<String, StorageError> {
    let out = cmd::output(
        Command::new("dpkg-deb").arg("-f").arg(deb).arg(name),
        "dpkg",
        deb,
    )?;
    Ok(String::from_utf8_lossy(&out).trim().to_string())
}

/// Unpacks a `.deb`'s files into `dir` (`dpkg-deb -x`).
pub(crate) fn extract(deb: &Path, dir: &Path) -> Result<(), StorageError> {
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    cmd::output(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir),
        "dpkg",
        dir,
    )?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_print_uris() {
        let text = "'http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1.35.0-4%2bdeb12u1%2bb1_amd64.deb' busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb 928188 SHA256:3D3FDBE9\n";
        assert_eq!(
            parse_print_uris(text).unwrap(),
            Uri {
                file: "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb".into(),
                size: 928188,
                sha256: Some("3d3fdbe9".into()),
            }
        );
        assert!(parse_print_uris("W: something\n").is_none());
    }

    #[test]
    fn first_dependency_of_the_kernel_metapackage() {
        assert_eq!(
            first_dependency("linux-image-6.1.0-41-amd64 (= 6.1.192-2)"),
            Some("linux-image-6.1.0-41-amd64")
        );
        assert_eq!(first_dependency("a | b, c"), Some("a"));
        assert_eq!(first_dependency("libc6:amd64 (>= 2)"), Some("libc6"));
        assert_eq!(first_dependency(""), None);
    }
}
