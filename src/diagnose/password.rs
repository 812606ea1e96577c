//! Reading a password for a CLI tool without it ever being a command-line
//! argument (which `ps` and shell history would show): one line from
//! standard input (`--password-stdin`), or a prompt on the terminal with
//! echo off.

use std::io::{BufRead, IsTerminal, Write};

use crate::config::Secret;

/// Reads the password: from standard input when `from_stdin`, else by
/// prompting on the terminal. Fails when neither is possible.
pub fn read_password(from_stdin: bool, prompt: &str) -> Result<Secret, String> {
    let stdin = std::io::stdin();
    if !from_stdin && !stdin.is_terminal() {
        return Err(
            "a password is needed: pipe it in with --password-stdin, or run in a terminal to be prompted"
                .into(),
        );
    }
    let interactive = !from_stdin;
    if interactive {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    let result = {
        let _echo = interactive.then(EchoOff::new);
        stdin.lock().read_line(&mut line)
    };
    if interactive {
        eprintln!();
    }
    result.map_err(|e| format!("cannot read the password: {e}"))?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err("empty password".into());
    }
    Ok(Secret::new(password))
}

/// Turns terminal echo off on standard input until dropped.
struct EchoOff {
    saved: Option<libc::termios>,
}

impl EchoOff {
    fn new() -> EchoOff {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a termios we own; a
        // failure (not a terminal) leaves `saved` empty and changes nothing.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut t) != 0 {
                return EchoOff { saved: None };
            }
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) != 0 {
                return EchoOff { saved: None };
            }
            EchoOff { saved: Some(saved) }
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            // SAFETY: restores the settings read in `new` on the same fd.
            unsafe {
                libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t);
            }
        }
    }
}
