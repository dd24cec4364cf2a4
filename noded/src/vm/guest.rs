//! Request/response channel to noded's guest `/init` over the serial console (a unix socket chardev).
//!
//! Readiness is a request answered, not a heartbeat: a heartbeat's period would dominate the figure.
//! Answers are `<kind> <nonce> <counter> [payload]`; the counter lives in guest RAM and increases with
//! every request, so a clone's first answer must continue its template's count.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("console socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("guest did not answer `{request}` within {timeout:?}")]
    Timeout { request: String, timeout: Duration },
    #[error("console closed (VM exited?)")]
    Closed,
    #[error("guest answer `{0}` is malformed")]
    Malformed(String),
    #[error("console line longer than {limit} bytes without a newline (guest output refused)")]
    LineTooLong { limit: usize },
}

/// Base kernel command line of noded's guest: its console is the first serial port, which every
/// backend connects to a unix socket. `no_timer_check`: on a loaded host a TCG guest can fail the
/// kernel's IO-APIC timer check and panic ("IO-APIC + timer doesn't work").
pub const GUEST_APPEND: &str = "console=ttyS0 quiet panic=1 no_timer_check";

/// Longest console line kept. Kernel lines are under 1 KiB; anything longer without a newline is a
/// broken or hostile guest, and buffering it would grow noded's memory without bound.
pub const MAX_LINE: usize = 4096;

/// One answer from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub counter: u64,
    pub payload: String,
}

pub struct GuestConsole {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_nonce: u64,
    /// Last lines of other console output (kernel, firmware): what a failure report shows.
    tail: std::collections::VecDeque<String>,
    /// The line being read. Kept here, not in the reading future, so a read cancelled by a timeout
    /// loses nothing of an answer that arrived in pieces.
    partial: Vec<u8>,
}

impl GuestConsole {
    pub async fn connect(path: &Path) -> Result<Self, GuestError> {
        let (r, w) = UnixStream::connect(path).await?.into_split();
        Ok(Self {
            reader: BufReader::new(r),
            writer: w,
            // Distinct per connection so answers to a previous owner's requests are never mistaken.
            next_nonce: u64::from(rand::random::<u32>()) << 16,
            tail: std::collections::VecDeque::new(),
            partial: Vec::new(),
        })
    }

    async fn send(&mut self, kind: &str) -> Result<u64, GuestError> {
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        self.writer
            .write_all(format!("{kind} {nonce}\n").as_bytes())
            .await?;
        Ok(nonce)
    }

    /// Reads until an answer of `kind` to one of `nonces` (kernel and firmware output is skipped).
    async fn read_answer(
        &mut self,
        kind: &str,
        nonces: &[u64],
    ) -> Result<(u64, Answer), GuestError> {
        loop {
            let line = self.read_line().await?;
            let text = String::from_utf8_lossy(&line).into_owned();
            for &nonce in nonces.iter().rev() {
                let tag = format!("{kind} {nonce} ");
                // Firmware output without a trailing newline may precede the answer on the same line.
                let Some(pos) = text.find(&tag) else { continue };
                let rest = text[pos + tag.len()..].trim_end();
                let (counter, payload) = rest.split_once(' ').unwrap_or((rest, ""));
                let counter = counter
                    .parse()
                    .map_err(|_| GuestError::Malformed(text.trim_end().to_string()))?;
                return Ok((
                    nonce,
                    Answer {
                        counter,
                        payload: payload.to_string(),
                    },
                ));
            }
            // No answer on this line: keep it for failure reports.
            let clean: String = text.chars().filter(|c| !c.is_control()).collect();
            if !clean.trim().is_empty() {
                if self.tail.len() == 12 {
                    self.tail.pop_front();
                }
                self.tail.push_back(clean.trim().to_string());
            }
        }
    }

    /// The next line (with its newline; the last one of a closed console may lack it), at most
    /// [`MAX_LINE`] bytes. Cancel-safe: a partial line stays buffered.
    async fn read_line(&mut self) -> Result<Vec<u8>, GuestError> {
        loop {
            let buf = self.reader.fill_buf().await?;
            if buf.is_empty() {
                if self.partial.is_empty() {
                    return Err(GuestError::Closed);
                }
                return Ok(std::mem::take(&mut self.partial));
            }
            let (take, complete) = match buf.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            if self.partial.len() + take > MAX_LINE {
                self.reader.consume(take);
                self.partial = Vec::new();
                return Err(GuestError::LineTooLong { limit: MAX_LINE });
            }
            self.partial.extend_from_slice(&buf[..take]);
            self.reader.consume(take);
            if complete {
                return Ok(std::mem::take(&mut self.partial));
            }
        }
    }

    /// The last lines the guest printed besides its answers (kernel messages on a panic).
    pub fn last_output(&self) -> String {
        self.tail.iter().cloned().collect::<Vec<_>>().join(" | ")
    }

    /// One request, one answer, within `timeout`.
    pub async fn request(&mut self, kind: &str, timeout: Duration) -> Result<Answer, GuestError> {
        let fut = async {
            let nonce = self.send(kind).await?;
            self.read_answer(answer_kind(kind), &[nonce])
                .await
                .map(|(_, a)| a)
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| GuestError::Timeout {
                request: kind.into(),
                timeout,
            })?
    }

    pub async fn ping(&mut self, timeout: Duration) -> Result<Answer, GuestError> {
        self.request("ping", timeout).await
    }

    /// Waits for a booting guest: pings every 20 ms until one is answered. Returns when the first
    /// answer arrived (the guest's readiness time); requests sent while it booted may still be queued.
    pub async fn wait_first(
        &mut self,
        timeout: Duration,
    ) -> Result<tokio::time::Instant, GuestError> {
        let fut = async {
            let mut sent = Vec::new();
            loop {
                sent.push(self.send("ping").await?);
                let wait = tokio::time::timeout(
                    Duration::from_millis(20),
                    self.read_answer("pong", &sent),
                )
                .await;
                match wait {
                    Ok(Ok(_)) => return Ok(tokio::time::Instant::now()),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => continue,
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| GuestError::Timeout {
                request: "ping (boot)".into(),
                timeout,
            })?
    }

    /// [`GuestConsole::wait_first`], then one more ping answered exactly, so no request sent while
    /// booting is still queued afterwards. Returns that answer (its counter is the guest's count).
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<Answer, GuestError> {
        let start = tokio::time::Instant::now();
        self.wait_first(timeout).await?;
        let left = timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_secs(5));
        self.ping(left).await
    }
}

fn answer_kind(kind: &str) -> &str {
    match kind {
        "ping" => "pong",
        other => other,
    }
}
