//! Standard output that treats a closed pipe as the reader being done.
//!
//! Rust ignores SIGPIPE, so `println!` panics when the reader has gone
//! (`handoff list-backends | head -3`). Restoring SIGPIPE would let a
//! dead worker's or server's pipe kill the runner and lose measured
//! cases, so the printing commands write through [`Out`] instead: once
//! the pipe is closed the rest of the output is dropped and the command
//! finishes with its own exit code (a regression found is still exit 1).
//! Diagnostics go through [`errln!`] for the same reason.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Standard output; a closed pipe swallows what follows.
pub struct Out;

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if CLOSED.load(Ordering::Relaxed) {
            return Ok(buf.len());
        }
        quiet_on_closed(io::stdout().lock().write(buf), buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if CLOSED.load(Ordering::Relaxed) {
            return Ok(());
        }
        quiet_on_closed(io::stdout().lock().flush(), ())
    }
}

fn quiet_on_closed<T>(r: io::Result<T>, done: T) -> io::Result<T> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            CLOSED.store(true, Ordering::Relaxed);
            Ok(done)
        }
        r => r,
    }
}

/// `print!` through [`Out`]; an error other than a closed pipe (a full
/// disk behind a redirect) is returned.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!($crate::out::Out, $($arg)*).and_then(|()| $crate::out::Out.flush())
    }};
}

/// `println!` through [`Out`].
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!($crate::out::Out, $($arg)*).and_then(|()| $crate::out::Out.flush())
    }};
}

/// `eprintln!` that cannot panic: a diagnostic whose stderr has gone
/// (`handoff run ... 2>&1 | head`) has nowhere left to go, and the
/// command must still finish its run and keep its exit code.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub(crate) use {errln, out, outln};
