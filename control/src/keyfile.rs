//! Key files as `[[sa]] key_file` reads them: hex digits (whitespace, colons
//! and a `0x` prefix allowed), key then 4-byte salt, not readable by group or
//! others. bitwctl reads them so the key goes to control over the admin
//! socket and never through a command line (visible in `ps`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use zeroize::Zeroizing;

/// Reads a key file; the error never contains the file's content.
pub fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("{}: cannot read the key file: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{}: the key file is readable or writable by others (mode {:o}); run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        ));
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read the key file: {e}", path.display()))?,
    );
    let trimmed = text.trim();
    let trimmed = trimmed
        .strip_prefix("0x")
        .or_else(|| trimmed.strip_prefix("0X"))
        .unwrap_or(trimmed);
    let digits: Zeroizing<String> = Zeroizing::new(
        trimmed
            .chars()
            .filter(|c| !c.is_whitespace() && *c != ':')
            .collect(),
    );
    if digits.is_empty() {
        return Err(format!("{}: the key file is empty", path.display()));
    }
    hex::decode(digits.as_bytes())
        .map(Zeroizing::new)
        .map_err(|_| {
            format!(
                "{}: the key file must hold the key and salt as hex digits (an even number of them)",
                path.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(tag: &str, mode: u32, text: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("bitwctl-key-{}-{tag}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn key_files_are_checked_and_never_echoed() {
        let p = write(
            "ok",
            0o600,
            "00:11:22:33 44556677\n8899aabbccddeeff01020304\n",
        );
        assert_eq!(read_key_file(&p).unwrap().len(), 20);
        let p = write("ro", 0o400, "0x0011");
        assert_eq!(&read_key_file(&p).unwrap()[..], &[0, 0x11]);
        let p = write("loose", 0o640, "0011");
        let e = read_key_file(&p).unwrap_err();
        assert!(e.contains("chmod 600") && e.contains("640"), "{e}");
        let p = write("nothex", 0o600, "secretsecret");
        let e = read_key_file(&p).unwrap_err();
        assert!(e.contains("hex digits") && !e.contains("secret"), "{e}");
        let e = read_key_file(Path::new("/nonexistent/bitw.key")).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
    }
}
