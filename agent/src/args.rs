//! Command line of `sessiond-agent`. Parsed by hand: five flags do not
//! justify a parser crate in a binary that lives in every sandbox.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::PathBuf;

use crate::proto::DATA_DIR;

pub const USAGE: &str = "\
usage: sessiond-agent [--init] [--listen-fd N | --listen PATH] [--data-dir DIR] [--python PATH]

  --init           run as PID 1 of a pid namespace: fork the agent, reap zombies,
                   exit with the agent's status
  --listen-fd N    serve HTTP on the already-listening Unix socket N (default 3)
  --listen PATH    bind a Unix socket at PATH and serve on it
  --data-dir DIR   the session's files and the working directory (default /mnt/data)
  --python PATH    the Python interpreter to run (default python3)
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Fd(RawFd),
    Path(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub init: bool,
    pub listen: Listen,
    pub data_dir: PathBuf,
    pub python: PathBuf,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("{0} needs a value")]
    MissingValue(String),
    #[error("--listen-fd wants a file descriptor number, got {0:?}")]
    BadFd(String),
    #[error("--listen and --listen-fd exclude each other")]
    BothListen,
    #[error("unknown argument {0:?}")]
    Unknown(String),
    #[error("help requested")]
    Help,
    #[error("version requested")]
    Version,
}

impl Args {
    pub fn parse<I: IntoIterator<Item = OsString>>(argv: I) -> Result<Args, ArgsError> {
        let mut init = false;
        let mut fd = None;
        let mut path = None;
        let mut data_dir = PathBuf::from(DATA_DIR);
        let mut python = PathBuf::from("python3");
        let mut it = argv.into_iter().skip(1);
        while let Some(arg) = it.next() {
            let name = arg.to_string_lossy().into_owned();
            let mut value = || {
                it.next()
                    .ok_or_else(|| ArgsError::MissingValue(name.clone()))
            };
            match name.as_str() {
                "--init" => init = true,
                "--listen-fd" => {
                    let v = value()?;
                    let s = v.to_string_lossy();
                    fd = Some(
                        s.parse::<RawFd>()
                            .ok()
                            .filter(|n| *n >= 0)
                            .ok_or_else(|| ArgsError::BadFd(s.into_owned()))?,
                    );
                }
                "--listen" => path = Some(PathBuf::from(value()?)),
                "--data-dir" => data_dir = PathBuf::from(value()?),
                "--python" => python = PathBuf::from(value()?),
                "-h" | "--help" => return Err(ArgsError::Help),
                "-V" | "--version" => return Err(ArgsError::Version),
                _ => return Err(ArgsError::Unknown(name)),
            }
        }
        let listen = match (fd, path) {
            (Some(_), Some(_)) => return Err(ArgsError::BothListen),
            (Some(n), None) => Listen::Fd(n),
            (None, Some(p)) => Listen::Path(p),
            (None, None) => Listen::Fd(3),
        };
        Ok(Args {
            init,
            listen,
            data_dir,
            python,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, ArgsError> {
        Args::parse(
            std::iter::once("sessiond-agent")
                .chain(args.iter().copied())
                .map(OsString::from),
        )
    }

    #[test]
    fn defaults_match_production() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.listen, Listen::Fd(3));
        assert_eq!(a.data_dir, PathBuf::from("/mnt/data"));
        assert_eq!(a.python, PathBuf::from("python3"));
        assert!(!a.init);
    }

    #[test]
    fn flags_are_read() {
        let a = parse(&[
            "--init",
            "--listen",
            "/tmp/s",
            "--data-dir",
            "/d",
            "--python",
            "/p",
        ])
        .unwrap();
        assert!(a.init);
        assert_eq!(a.listen, Listen::Path("/tmp/s".into()));
        assert_eq!(a.data_dir, PathBuf::from("/d"));
        assert_eq!(a.python, PathBuf::from("/p"));
    }

    #[test]
    fn bad_input_is_refused() {
        assert_eq!(
            parse(&["--listen-fd", "x"]),
            Err(ArgsError::BadFd("x".into()))
        );
        assert_eq!(
            parse(&["--listen-fd"]),
            Err(ArgsError::MissingValue("--listen-fd".into()))
        );
        assert_eq!(
            parse(&["--listen-fd", "3", "--listen", "/s"]),
            Err(ArgsError::BothListen)
        );
        assert_eq!(
            parse(&["--bogus"]),
            Err(ArgsError::Unknown("--bogus".into()))
        );
    }
}
