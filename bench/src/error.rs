//! The tool's one error type: a message that already says what was being done and why it
//! failed.
//!
//! A load tool's errors are read by a person at a terminal, never matched on by code, so a
//! string built up with context (`connecting to ws://…: connection refused`) is all that is
//! needed; a dependency for it would buy nothing.

use std::fmt;

#[derive(Debug)]
pub struct BenchError(String);

pub type Result<T> = std::result::Result<T, BenchError>;

impl BenchError {
    pub fn msg(text: impl Into<String>) -> BenchError {
        BenchError(text.into())
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

/// Prefixes an error with what was being attempted.
pub trait Context<T> {
    fn context(self, what: impl fmt::Display) -> Result<T>;
    fn with_context<S: fmt::Display>(self, what: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| BenchError(format!("{what}: {e}")))
    }

    fn with_context<S: fmt::Display>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| BenchError(format!("{}: {e}", what())))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.ok_or_else(|| BenchError(what.to_string()))
    }

    fn with_context<S: fmt::Display>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.ok_or_else(|| BenchError(what().to_string()))
    }
}

/// Returns early with a formatted [`BenchError`].
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::BenchError::msg(format!($($arg)*)))
    };
}
pub(crate) use bail;
