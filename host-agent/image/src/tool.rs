//! Running the external tools an image needs (`mkfs.ext4`, `debootstrap`, `chroot`): finding
//! them (and naming the Debian package when one is missing), streaming their output lines to a
//! progress callback, and keeping the last lines for the error when they fail.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;

/// Lines of output kept for a failure's error.
const TAIL_LINES: usize = 30;
/// Longest line passed on (longer ones are cut).
const MAX_LINE: usize = 2000;
/// Environment variables passed on to tools.
const PROXY_VARS: [&str; 6] = [
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
];
/// Where tools are looked for besides `$PATH` (a daemon's PATH often lacks the sbin ones).
const EXTRA_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The tool is not installed.
    #[error("{tool} not found (install the Debian package {package})")]
    Missing {
        tool: &'static str,
        package: &'static str,
    },
    /// Starting the tool failed.
    #[error("starting {tool}")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Waiting for the tool failed.
    #[error("waiting for {tool}")]
    Wait {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The tool exited unsuccessfully; `output` is the end of what it printed.
    #[error("{tool} failed ({status}): {output}")]
    Failed {
        tool: &'static str,
        status: ExitStatus,
        output: String,
    },
}

/// An external tool and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    /// The executable's name.
    pub name: &'static str,
    /// The Debian package that installs it.
    pub package: &'static str,
}

/// `mkfs.ext4`.
pub const MKFS_EXT4: Tool = Tool {
    name: "mkfs.ext4",
    package: "e2fsprogs",
};
/// `debugfs`.
pub const DEBUGFS: Tool = Tool {
    name: "debugfs",
    package: "e2fsprogs",
};
/// `debootstrap`.
pub const DEBOOTSTRAP: Tool = Tool {
    name: "debootstrap",
    package: "debootstrap",
};
/// `chroot`.
pub const CHROOT: Tool = Tool {
    name: "chroot",
    package: "coreutils",
};

impl Tool {
    /// The tool's path, from `$PATH` or the usual system directories.
    pub fn find(&self) -> Result<PathBuf, ToolError> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(EXTRA_DIRS.iter().map(PathBuf::from))
            .map(|dir| dir.join(self.name))
            .find(|p| is_executable(p))
            .ok_or(ToolError::Missing {
                tool: self.name,
                package: self.package,
            })
    }

    /// A command for the tool, with a clean environment: a fixed `PATH`, `LANG=C.UTF-8`, and
    /// the caller's proxy settings (debootstrap and pip download through them).
    pub fn command(&self) -> Result<Command, ToolError> {
        let mut cmd = Command::new(self.find()?);
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null());
        for var in PROXY_VARS {
            if let Some(value) = std::env::var_os(var) {
                cmd.env(var, value);
            }
        }
        Ok(cmd)
    }

    /// Runs `cmd`, passing each output line (stdout and stderr) to `progress` as
    /// `"<prefix>: <line>"`.
    pub fn run(
        &self,
        mut cmd: Command,
        prefix: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), ToolError> {
        tracing::debug!(tool = self.name, ?cmd, "running");
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ToolError::Spawn {
                tool: self.name,
                source,
            })?;
        let (tx, rx) = mpsc::channel::<String>();
        let readers: Vec<_> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        .map(|stream| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).split(b'\n') {
                    let Ok(line) = line else { break };
                    let mut line = String::from_utf8_lossy(&line).into_owned();
                    if line.len() > MAX_LINE {
                        let mut cut = MAX_LINE;
                        while !line.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        line.truncate(cut);
                    }
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
        drop(tx);
        let mut tail = VecDeque::with_capacity(TAIL_LINES);
        for line in rx {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            progress(&format!("{prefix}: {line}"));
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.to_owned());
        }
        for reader in readers {
            // A reader thread only ends by itself; a panic there lost some output lines only.
            let _ = reader.join();
        }
        let status = child.wait().map_err(|source| ToolError::Wait {
            tool: self.name,
            source,
        })?;
        if status.success() {
            Ok(())
        } else {
            let output = Vec::from(tail).join("\n");
            Err(ToolError::Failed {
                tool: self.name,
                status,
                output,
            })
        }
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SH: Tool = Tool {
        name: "sh",
        package: "dash",
    };

    #[test]
    fn missing_tool_names_its_package() {
        let tool = Tool {
            name: "no-such-tool-here",
            package: "some-package",
        };
        let err = tool.find().unwrap_err();
        assert!(matches!(
            err,
            ToolError::Missing {
                package: "some-package",
                ..
            }
        ));
        assert!(err.to_string().contains("some-package"));
    }

    #[test]
    fn streams_lines_and_keeps_the_tail_on_failure() {
        let mut cmd = SH.command().unwrap();
        cmd.args(["-c", "echo one; echo two >&2; exit 3"]);
        let mut lines = Vec::new();
        let err = SH
            .run(cmd, "sh", &mut |l| lines.push(l.to_owned()))
            .unwrap_err();
        lines.sort();
        assert_eq!(lines, ["sh: one", "sh: two"]);
        let ToolError::Failed { status, output, .. } = err else {
            panic!("{err:?}")
        };
        assert_eq!(status.code(), Some(3));
        assert!(output.contains("two"));
    }
}
