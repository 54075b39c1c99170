//! The one printer of an error with its causes, shared by every process's edge (binaries and
//! log lines): `outer: cause: root cause`.
//!
//! Libraries return typed errors whose messages never repeat their source (see the house
//! style); this is how the whole chain becomes one line.

use std::error::Error;
use std::fmt;

/// Displays an error with its whole `source()` chain on one line, `outer: cause: root cause`.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a dyn Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// [`ErrorChain`] as a `String`, for error values that travel as text (API answers, JSON-RPC
/// errors).
pub fn error_chain(e: &dyn Error) -> String {
    ErrorChain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn the_whole_chain_is_one_line() {
        let e = Outer(Middle(std::io::Error::other("root")));
        assert_eq!(ErrorChain(&e).to_string(), "outer: middle: root");
        assert_eq!(error_chain(&e), "outer: middle: root");
        assert_eq!(error_chain(&std::io::Error::other("alone")), "alone");
    }
}
