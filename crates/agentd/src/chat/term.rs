//! `agentd chat` on a terminal: a line editor (rustyline: arrow keys, history, Emacs keys) that reads a line
//! only when the client asks for one, and output that never garbles the line being typed.
//!
//! - The editor runs on a thread of its own; [`LineEditor::read`] shows a prompt, and the line (or Ctrl-D, or
//!   Ctrl-C at an empty prompt) comes back on the client's input channel.
//! - While a prompt is up, output goes through rustyline's external printer, a whole line at a time (a partial
//!   line is held until its end or until the prompt is gone): the printer redraws the prompt and the typed text
//!   below what it printed.
//! - While no prompt is up (a turn streams), the terminal does not echo keys: what the user types ahead stays
//!   in the terminal's input queue, out of the answer's way, and shows up at the next prompt, ready to edit.
//!   Ctrl-C is then the terminal's SIGINT (the client cancels the turn); what was typed ahead is kept.
//! - Ctrl-C at a prompt with text clears the line (Ctrl-Y brings it back); at an empty prompt it is an
//!   interrupt (the client exits, or cancels a turn waiting for an answer).
//! - History: every line entered, in memory and appended to `$XDG_STATE_HOME/agentd/chat_history` (default
//!   `~/.local/state/agentd/chat_history`) when that file can be written.
//!
//! The terminal's settings are restored when the editor is dropped, whatever state the thread is in.

use std::io::Write;
use std::path::PathBuf;

use rustyline::error::ReadlineError;
use rustyline::history::FileHistory;
use rustyline::{
    Cmd, ConditionalEventHandler, Editor, Event, EventContext, EventHandler, ExternalPrinter,
    KeyEvent, Movement, RepeatCount,
};
use tokio::sync::mpsc;

use super::Input;

/// Lines of history kept.
const HISTORY_LINES: usize = 1000;

pub struct LineEditor {
    /// Prompts for the editor thread: each is one line to read.
    requests: std::sync::mpsc::Sender<String>,
    printer: Box<dyn ExternalPrinter + Send>,
    /// A prompt is up (asked for and not answered yet).
    reading: bool,
    /// Output held while a prompt is up: the start of a line whose end has not come yet.
    pending: String,
    _echo: EchoOff,
}

impl LineEditor {
    /// Starts the editor thread; its lines go to `input`.
    pub fn start(input: mpsc::Sender<Input>) -> Result<LineEditor, String> {
        let echo = EchoOff::new();
        let (requests, prompts) = std::sync::mpsc::channel::<String>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut editor = match new_editor() {
                Ok(e) => e,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let printer = match editor.create_external_printer() {
                Ok(p) => Box::new(p) as Box<dyn ExternalPrinter + Send>,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot use the terminal: {e}")));
                    return;
                }
            };
            if ready_tx.send(Ok(printer)).is_err() {
                return;
            }
            let file = history_file();
            if let Some(f) = &file {
                let _ = editor.load_history(f);
            }
            for prompt in prompts {
                let read = match editor.readline(&prompt) {
                    Ok(line) => {
                        if !line.trim().is_empty() {
                            let _ = editor.add_history_entry(line.as_str());
                            if let Some(f) = &file {
                                let _ = editor.append_history(f);
                            }
                        }
                        Input::Line(line)
                    }
                    Err(ReadlineError::Interrupted) => Input::Interrupt,
                    Err(_) => Input::Eof,
                };
                if input.blocking_send(read).is_err() {
                    return;
                }
            }
        });
        let printer = ready_rx
            .recv()
            .map_err(|_| "the line editor did not start".to_string())??;
        Ok(LineEditor {
            requests,
            printer,
            reading: false,
            pending: String::new(),
            _echo: echo,
        })
    }

    /// Shows `prompt` and reads a line (unless a prompt is up already).
    pub fn read(&mut self, prompt: &str) {
        if self.reading {
            return;
        }
        // What was held for a prompt that is gone goes out first, so the prompt comes after it.
        self.flush_pending();
        if self.requests.send(prompt.to_string()).is_ok() {
            self.reading = true;
        }
    }

    pub fn reading(&self) -> bool {
        self.reading
    }

    /// The prompt was answered (a line, Ctrl-D or Ctrl-C came back): output goes straight out again.
    pub fn answered(&mut self) {
        self.reading = false;
        self.flush_pending();
    }

    pub fn print(&mut self, text: &str) {
        if !self.reading {
            write_out(text);
            return;
        }
        self.pending.push_str(text);
        if let Some(end) = self.pending.rfind('\n') {
            let lines: String = self.pending.drain(..=end).collect();
            if self.printer.print(lines.clone()).is_err() {
                write_out(&lines);
            }
        }
    }

    fn flush_pending(&mut self) {
        if !self.pending.is_empty() {
            write_out(&std::mem::take(&mut self.pending));
        }
    }
}

fn write_out(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn new_editor() -> Result<Editor<(), FileHistory>, String> {
    let config = rustyline::Config::builder()
        .auto_add_history(false)
        .max_history_size(HISTORY_LINES)
        .map_err(|e| format!("cannot set up the line editor: {e}"))?
        .build();
    let history = FileHistory::with_config(&config);
    let mut editor: Editor<(), FileHistory> = Editor::with_history(config, history)
        .map_err(|e| format!("cannot use the terminal: {e}"))?;
    editor.bind_sequence(
        KeyEvent::ctrl('C'),
        EventHandler::Conditional(Box::new(ClearOrInterrupt)),
    );
    Ok(editor)
}

/// Ctrl-C: clears a line that has text (into the kill ring: Ctrl-Y yanks it back); at an empty line, the
/// default (an interrupt).
struct ClearOrInterrupt;

impl ConditionalEventHandler for ClearOrInterrupt {
    fn handle(
        &self,
        _evt: &Event,
        _n: RepeatCount,
        _positive: bool,
        ctx: &EventContext,
    ) -> Option<Cmd> {
        if ctx.line().is_empty() {
            None
        } else {
            Some(Cmd::Kill(Movement::WholeLine))
        }
    }
}

/// `$XDG_STATE_HOME/agentd/chat_history`, else `~/.local/state/agentd/chat_history`, its folder created; None
/// when neither can be had (history is then kept in memory only).
fn history_file() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".local/state"))
        })?;
    let dir = state.join("agentd");
    std::fs::create_dir_all(&dir).ok()?;
    let file = dir.join("chat_history");
    // rustyline appends to an existing file only: start it empty, readable by its owner alone (what was typed
    // may be private).
    if !file.exists() {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(&file).ok()?;
    }
    Some(file)
}

/// Turns the terminal's echo off for as long as it lives (restoring the settings it found): keys typed while
/// a turn streams are kept for the next prompt instead of being echoed into the answer, also when Ctrl-C
/// cancels the turn (no flush of the input on the interrupt).
struct EchoOff {
    #[cfg(unix)]
    saved: Option<nix::sys::termios::Termios>,
}

impl EchoOff {
    fn new() -> EchoOff {
        #[cfg(unix)]
        {
            use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
            let stdin = std::io::stdin();
            let saved = tcgetattr(&stdin).ok();
            if let Some(t) = &saved {
                let mut quiet = t.clone();
                quiet.local_flags.remove(LocalFlags::ECHO);
                // Ctrl-C (cancelling a turn) keeps what was typed ahead.
                quiet.local_flags.insert(LocalFlags::NOFLSH);
                let _ = tcsetattr(&stdin, SetArg::TCSADRAIN, &quiet);
            }
            EchoOff { saved }
        }
        #[cfg(not(unix))]
        {
            EchoOff {}
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(t) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSADRAIN,
                t,
            );
        }
    }
}
