//! Files under the data directory.
//!
//! Names come from the network and the directory is writable by hostile
//! code, so string checks are only the first gate: every lookup goes through
//! openat2(2) with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` relative to an
//! `O_PATH` descriptor of the data directory, which makes the kernel refuse
//! any resolution (`..`, absolute symlinks, symlinks pointing out, magic
//! links in /proc) that would leave it, even if the tree changes under us.
//! Creation and removal then act on one plain name inside a directory
//! descriptor resolved that way.

use std::ffi::CStr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, SecondsFormat, Utc};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::proto::{FileEntry, DATA_DIR};

/// Prefix of in-flight uploads; never listed.
const UPLOAD_TMP_PREFIX: &str = ".sessiond-upload-";
/// Bounds on a listing, so a hostile tree cannot make it unbounded.
const MAX_DEPTH: usize = 64;
const MAX_ENTRIES: usize = 100_000;
/// Total bytes of the names listed: 100 000 entries of 64 nested 255-byte
/// names would be 1.6 GB, far past what the daemon reads back (64 MiB).
const MAX_LIST_NAME_BYTES: usize = 16 << 20;

/// What a listing may still hold.
struct ListBudget {
    entries: usize,
    name_bytes: usize,
}

static UPLOAD_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("file not found: {0}")]
    NotFound(String),
    #[error("upload is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("no space left in the session's data directory while writing {0:?}")]
    NoSpace(String),
    #[error("{op} {path:?}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS
}

fn invalid(path: &str, reason: &'static str) -> FilesError {
    FilesError::InvalidPath {
        path: path.to_string(),
        reason,
    }
}

/// Maps an errno of a lookup of `path` to the error the caller sees.
fn lookup_error(op: &'static str, path: &str, e: Errno) -> FilesError {
    match e {
        Errno::XDEV => invalid(path, "it resolves outside the data directory"),
        Errno::LOOP => invalid(path, "too many symbolic links or a magic link"),
        Errno::NOENT | Errno::NOTDIR => FilesError::NotFound(path.to_string()),
        Errno::NOSPC | Errno::DQUOT => FilesError::NoSpace(path.to_string()),
        Errno::NAMETOOLONG => invalid(path, "name too long"),
        e => FilesError::Io {
            op,
            path: path.to_string(),
            source: e.into(),
        },
    }
}

/// A name from a request, checked and split into its components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelPath {
    parts: Vec<String>,
}

impl RelPath {
    /// Accepts names relative to the data directory, or absolute under
    /// `/mnt/data/`; refuses `..`, NUL, and any other absolute path.
    pub fn parse(raw: &str) -> Result<RelPath, FilesError> {
        if raw.contains('\0') {
            return Err(invalid(raw, "it contains a NUL byte"));
        }
        let rel = if raw.starts_with('/') {
            raw.strip_prefix(DATA_DIR)
                .and_then(|r| r.strip_prefix('/'))
                .ok_or_else(|| invalid(raw, "absolute paths must be under /mnt/data/"))?
        } else {
            raw
        };
        let mut parts = Vec::new();
        for part in rel.split('/') {
            match part {
                "" | "." => {}
                ".." => return Err(invalid(raw, "`..` is not allowed")),
                p => parts.push(p.to_string()),
            }
        }
        if parts.is_empty() {
            return Err(invalid(raw, "it names no file"));
        }
        Ok(RelPath { parts })
    }

    pub fn as_string(&self) -> String {
        self.parts.join("/")
    }

    fn parent(&self) -> Option<String> {
        (self.parts.len() > 1).then(|| self.parts[..self.parts.len() - 1].join("/"))
    }

    fn file_name(&self) -> &str {
        self.parts.last().map(String::as_str).unwrap_or("")
    }
}

/// An open file ready to stream, with its metadata.
pub struct OpenFile {
    pub file: std::fs::File,
    pub entry: FileEntry,
}

/// The data directory, held open.
pub struct DataDir {
    root: OwnedFd,
    path: PathBuf,
}

impl DataDir {
    pub fn open(path: &Path) -> Result<DataDir, FilesError> {
        let root = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FilesError::Io {
            op: "open the data directory",
            path: path.display().to_string(),
            source: e.into(),
        })?;
        Ok(DataDir {
            root,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open_beneath(&self, rel: &str, flags: OFlags, mode: Mode) -> Result<OwnedFd, Errno> {
        loop {
            match rustix::fs::openat2(
                &self.root,
                rel,
                flags | OFlags::CLOEXEC,
                mode,
                resolve_flags(),
            ) {
                // The kernel asks for a retry when a rename raced the lookup.
                Err(Errno::AGAIN) => continue,
                r => return r,
            }
        }
    }

    /// The directory that holds `rel`'s last component (the root itself for
    /// a top-level name).
    fn parent_dir(&self, rel: &RelPath) -> Result<OwnedFd, FilesError> {
        let name = rel.as_string();
        match rel.parent() {
            None => self
                .open_beneath(".", OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
                .map_err(|e| lookup_error("open", &name, e)),
            Some(p) => self
                .open_beneath(&p, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
                .map_err(|e| lookup_error("open", &name, e)),
        }
    }

    /// Like [`Self::parent_dir`], creating missing directories on the way.
    fn make_parent_dir(&self, rel: &RelPath) -> Result<OwnedFd, FilesError> {
        let name = rel.as_string();
        let mut dir = self
            .open_beneath(".", OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
            .map_err(|e| lookup_error("open", &name, e))?;
        for i in 0..rel.parts.len() - 1 {
            let prefix = rel.parts[..=i].join("/");
            let next =
                match self.open_beneath(&prefix, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) => {
                        // One plain name inside a directory resolved beneath the
                        // root: mkdirat cannot follow anything here.
                        match rustix::fs::mkdirat(
                            &dir,
                            rel.parts[i].as_str(),
                            Mode::from_raw_mode(0o755),
                        ) {
                            Ok(()) | Err(Errno::EXIST) => {}
                            Err(e) => return Err(lookup_error("create directory", &name, e)),
                        }
                        self.open_beneath(&prefix, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
                            .map_err(|e| lookup_error("open", &name, e))?
                    }
                    Err(Errno::NOTDIR) => {
                        return Err(invalid(&name, "a parent is not a directory"))
                    }
                    Err(e) => return Err(lookup_error("open", &name, e)),
                };
            dir = next;
        }
        Ok(dir)
    }

    pub fn stat(&self, rel: &RelPath) -> Result<FileEntry, FilesError> {
        let name = rel.as_string();
        let fd = self
            .open_beneath(&name, OFlags::PATH, Mode::empty())
            .map_err(|e| lookup_error("open", &name, e))?;
        entry_of(&fd, &name)
    }

    /// Opens a regular file for download.
    pub fn open_read(&self, rel: &RelPath) -> Result<OpenFile, FilesError> {
        let name = rel.as_string();
        // O_NONBLOCK: a FIFO planted in the data directory must not hang us
        // in open(2); it is refused below as not a regular file.
        let fd = self
            .open_beneath(
                &name,
                OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
                Mode::empty(),
            )
            .map_err(|e| lookup_error("open", &name, e))?;
        let entry = entry_of(&fd, &name)?;
        let flags = rustix::fs::fcntl_getfl(&fd).map_err(|e| lookup_error("open", &name, e))?;
        rustix::fs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK)
            .map_err(|e| lookup_error("open", &name, e))?;
        Ok(OpenFile {
            file: std::fs::File::from(fd),
            entry,
        })
    }

    /// Creates a temporary file beside `rel` for an upload (parents are
    /// created). [`Upload::commit`] renames it into place.
    pub fn begin_upload(&self, rel: &RelPath) -> Result<Upload, FilesError> {
        let name = rel.as_string();
        let dir = self.make_parent_dir(rel)?;
        let tmp = format!(
            "{UPLOAD_TMP_PREFIX}{}-{}",
            std::process::id(),
            UPLOAD_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let fd = rustix::fs::openat(
            &dir,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map_err(|e| lookup_error("create", &name, e))?;
        Ok(Upload {
            dir,
            tmp,
            rel: rel.clone(),
            file: Some(std::fs::File::from(fd)),
        })
    }

    pub fn delete(&self, rel: &RelPath) -> Result<(), FilesError> {
        let name = rel.as_string();
        let dir = self.parent_dir(rel)?;
        match rustix::fs::unlinkat(&dir, rel.file_name(), AtFlags::empty()) {
            Ok(()) => Ok(()),
            Err(Errno::ISDIR) => {
                match rustix::fs::unlinkat(&dir, rel.file_name(), AtFlags::REMOVEDIR) {
                    Ok(()) => Ok(()),
                    Err(Errno::NOTEMPTY) | Err(Errno::EXIST) => {
                        Err(invalid(&name, "the directory is not empty"))
                    }
                    Err(e) => Err(lookup_error("delete", &name, e)),
                }
            }
            Err(e) => Err(lookup_error("delete", &name, e)),
        }
    }

    /// Every regular file under the data directory, sorted by name.
    /// Symbolic links are not followed.
    pub fn list(&self) -> Result<Vec<FileEntry>, FilesError> {
        let root = self
            .open_beneath(".", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
            .map_err(|e| lookup_error("open", ".", e))?;
        let mut out = Vec::new();
        let mut budget = ListBudget {
            entries: MAX_ENTRIES,
            name_bytes: MAX_LIST_NAME_BYTES,
        };
        walk(&root, "", 0, &mut out, &mut budget)?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

fn walk(
    dir: &OwnedFd,
    prefix: &str,
    depth: usize,
    out: &mut Vec<FileEntry>,
    budget: &mut ListBudget,
) -> Result<(), FilesError> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    let show = if prefix.is_empty() { "." } else { prefix };
    let entries = rustix::fs::Dir::read_from(dir).map_err(|e| lookup_error("list", show, e))?;
    for entry in entries {
        if budget.entries == 0 {
            return Ok(());
        }
        let Ok(entry) = entry else { continue };
        let raw: &CStr = entry.file_name();
        let bytes = raw.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        let file_name = String::from_utf8_lossy(bytes).into_owned();
        if file_name.starts_with(UPLOAD_TMP_PREFIX) {
            continue;
        }
        let name = if prefix.is_empty() {
            file_name
        } else {
            format!("{prefix}/{file_name}")
        };
        // Entries can vanish between readdir and stat: skip them.
        let Ok(st) = rustix::fs::statat(dir, raw, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => {
                let Some(left) = budget.name_bytes.checked_sub(name.len()) else {
                    budget.entries = 0;
                    return Ok(());
                };
                budget.name_bytes = left;
                budget.entries -= 1;
                out.push(FileEntry {
                    name,
                    size: st.st_size as u64,
                    last_modified: rfc3339(st.st_mtime, st.st_mtime_nsec as u32),
                })
            }
            FileType::Directory => {
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                if let Ok(sub) = rustix::fs::openat(dir, raw, flags, Mode::empty()) {
                    walk(&sub, &name, depth + 1, out, budget)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn entry_of<Fd: AsFd>(fd: Fd, name: &str) -> Result<FileEntry, FilesError> {
    let st = rustix::fs::fstat(fd).map_err(|e| lookup_error("stat", name, e))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(invalid(name, "not a regular file"));
    }
    Ok(FileEntry {
        name: name.to_string(),
        size: st.st_size as u64,
        last_modified: rfc3339(st.st_mtime, st.st_mtime_nsec as u32),
    })
}

/// RFC 3339 in UTC with microseconds, e.g. `2024-05-02T07:21:07.992261Z`.
pub fn rfc3339(secs: i64, nanos: u32) -> String {
    DateTime::<Utc>::from_timestamp(secs, nanos)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// An upload in progress: a temporary file beside its destination. Dropped
/// without [`Upload::commit`], the temporary file is removed.
pub struct Upload {
    dir: OwnedFd,
    tmp: String,
    rel: RelPath,
    file: Option<std::fs::File>,
}

impl Upload {
    /// The file to write the body into (taken once).
    pub fn take_file(&mut self) -> Option<std::fs::File> {
        self.file.take()
    }

    pub fn name(&self) -> String {
        self.rel.as_string()
    }

    /// Maps a write error to what the client sees.
    pub fn write_error(&self, e: std::io::Error) -> FilesError {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => {
                FilesError::NoSpace(self.name())
            }
            _ => FilesError::Io {
                op: "write",
                path: self.name(),
                source: e,
            },
        }
    }

    /// Renames the finished file into place and returns its entry.
    pub fn commit(mut self) -> Result<FileEntry, FilesError> {
        self.file = None;
        let name = self.name();
        // renameat(2) replaces a final symlink itself, never its target.
        match rustix::fs::renameat(
            &self.dir,
            self.tmp.as_str(),
            &self.dir,
            self.rel.file_name(),
        ) {
            Ok(()) => {}
            Err(Errno::ISDIR) | Err(Errno::NOTEMPTY) | Err(Errno::EXIST) => {
                return Err(invalid(&name, "a directory has that name"))
            }
            Err(e) => return Err(lookup_error("rename", &name, e)),
        }
        self.tmp.clear();
        let fd = rustix::fs::openat(
            &self.dir,
            self.rel.file_name(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| lookup_error("stat", &name, e))?;
        entry_of(&fd, &name)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.tmp.is_empty() {
            let _ = rustix::fs::unlinkat(&self.dir, self.tmp.as_str(), AtFlags::empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir()
                .join(format!("sessiond-agent-files-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(p.join("data")).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn rel(s: &str) -> RelPath {
        RelPath::parse(s).unwrap()
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(rel("a/./b//c").as_string(), "a/b/c");
        assert_eq!(rel("/mnt/data/x/y").as_string(), "x/y");
        for bad in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "/mnt/datax/y",
            "a\0b",
            "",
            "/mnt/data/",
            ".",
        ] {
            assert!(
                matches!(RelPath::parse(bad), Err(FilesError::InvalidPath { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn upload_list_read_delete() {
        let t = TempDir::new("roundtrip");
        let d = DataDir::open(&t.0.join("data")).unwrap();
        let mut up = d.begin_upload(&rel("sub/dir/f.txt")).unwrap();
        up.take_file().unwrap().write_all(b"hello").unwrap();
        let e = up.commit().unwrap();
        assert_eq!((e.name.as_str(), e.size), ("sub/dir/f.txt", 5));
        assert!(e.last_modified.ends_with('Z'));
        let names: Vec<_> = d.list().unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["sub/dir/f.txt"]);
        let mut s = String::new();
        d.open_read(&rel("sub/dir/f.txt"))
            .unwrap()
            .file
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "hello");
        d.delete(&rel("sub/dir/f.txt")).unwrap();
        assert!(matches!(
            d.stat(&rel("sub/dir/f.txt")),
            Err(FilesError::NotFound(_))
        ));
        assert!(matches!(
            d.delete(&rel("nope")),
            Err(FilesError::NotFound(_))
        ));
    }

    #[test]
    fn listing_stops_at_its_name_budget() {
        let t = TempDir::new("budget");
        let data = t.0.join("data");
        let long = "n".repeat(200);
        let deep = data.join(&long).join(&long);
        std::fs::create_dir_all(&deep).unwrap();
        for i in 0..50 {
            std::fs::write(deep.join(format!("{long}{i}")), "x").unwrap();
        }
        let d = DataDir::open(&data).unwrap();
        assert_eq!(d.list().unwrap().len(), 50);
        let root = d
            .open_beneath(".", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
            .unwrap();
        let mut out = Vec::new();
        let mut budget = ListBudget {
            entries: MAX_ENTRIES,
            name_bytes: 10 * 610,
        };
        walk(&root, "", 0, &mut out, &mut budget).unwrap();
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn abandoned_upload_leaves_nothing() {
        let t = TempDir::new("abandon");
        let d = DataDir::open(&t.0.join("data")).unwrap();
        let mut up = d.begin_upload(&rel("f")).unwrap();
        up.take_file().unwrap().write_all(b"partial").unwrap();
        drop(up);
        assert_eq!(std::fs::read_dir(t.0.join("data")).unwrap().count(), 0);
    }

    #[test]
    fn symlinks_out_are_refused() {
        let t = TempDir::new("symlinks");
        std::fs::write(t.0.join("secret"), "s").unwrap();
        let data = t.0.join("data");
        std::os::unix::fs::symlink(t.0.join("secret"), data.join("abs")).unwrap();
        std::os::unix::fs::symlink("../secret", data.join("rel")).unwrap();
        std::os::unix::fs::symlink("..", data.join("up")).unwrap();
        std::os::unix::fs::symlink("/proc/self/root", data.join("magic")).unwrap();
        std::fs::write(data.join("inside"), "i").unwrap();
        std::os::unix::fs::symlink("inside", data.join("ok")).unwrap();
        let d = DataDir::open(&data).unwrap();
        for name in ["abs", "rel", "up/secret", "magic/etc/passwd"] {
            assert!(
                matches!(d.open_read(&rel(name)), Err(FilesError::InvalidPath { .. })),
                "{name} readable"
            );
            assert!(matches!(
                d.stat(&rel(name)),
                Err(FilesError::InvalidPath { .. })
            ));
        }
        assert!(matches!(
            d.begin_upload(&rel("up/secret2")),
            Err(FilesError::InvalidPath { .. })
        ));
        assert!(!t.0.join("secret2").exists());
        assert_eq!(d.stat(&rel("ok")).unwrap().size, 1);
        // Uploading over a link replaces the link, never writes its target.
        let mut up = d.begin_upload(&rel("abs")).unwrap();
        up.take_file().unwrap().write_all(b"new").unwrap();
        up.commit().unwrap();
        assert_eq!(std::fs::read_to_string(t.0.join("secret")).unwrap(), "s");
    }
}
