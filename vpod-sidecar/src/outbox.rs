//! The queue of frames waiting to go to the host, shared by every control connection of a boot.
//!
//! The agent runner pushes `AgentStarted`, `AgentOutput`, `Error` and the final `AgentExited`
//! here whether or not a control connection is up; the writer thread of the current session
//! ([`crate::control`]) takes them off in order. A frame leaves the queue only after it was
//! written whole to the socket ([`Outbox::commit`]); a failed write puts it back at the front
//! ([`Outbox::restore`]) and the next connection sends it again from its first byte.
//!
//! # Backpressure
//!
//! Agent output is bounded: [`Outbox::push_output`] blocks while the queued output exceeds the
//! cap ([`OUTPUT_CAP`], 4 MiB). The pipe reader then stops reading, the pipe fills and the agent
//! blocks in `write`. Nothing is dropped, however long the host is away. Other messages are
//! small and rare and are never blocked.
//!
//! # The final frame
//!
//! `AgentExited` is pushed with [`Outbox::push_final`]; nothing queued after it is sent. The
//! writer reports that it wrote it with [`Outbox::final_written`].

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shared_proto::frame::encode_frame;
use shared_proto::message::{ExitStatus, GuestToHost, OutputStream};

/// The most agent output held for the host, in bytes, before the pipe readers pause.
pub const OUTPUT_CAP: usize = 4 << 20;

/// One encoded frame.
#[derive(Debug)]
pub struct Queued {
    /// The frame bytes (length prefix and body).
    pub frame: Vec<u8>,
    /// Agent output bytes it carries (counted against [`OUTPUT_CAP`]).
    output_len: usize,
    /// Whether it is the final `AgentExited`.
    pub is_final: bool,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Queued>,
    /// Output bytes queued or in flight.
    output_bytes: usize,
    /// The current session and whether it is active.
    generation: u64,
    active: bool,
    final_queued: bool,
    final_written: bool,
}

/// The shared queue of frames for the host.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    changed: Condvar,
    cap: usize,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::with_cap(OUTPUT_CAP)
    }
}

impl Outbox {
    /// An outbox that holds at most `cap` bytes of agent output.
    pub fn with_cap(cap: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            cap,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking holder leaves the queue consistent (every change is one push or pop).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(|p| p.into_inner())
    }

    fn enqueue(&self, msg: &GuestToHost, output_len: usize, is_final: bool) {
        let frame = match encode_frame(msg) {
            Ok(frame) => frame,
            Err(e) => {
                // Only an oversize frame fails, and every message here is far below the cap.
                tracing::error!(error = %crate::ErrorChain(&e), "cannot encode a frame");
                return;
            }
        };
        let mut st = self.lock();
        if st.final_queued {
            return;
        }
        st.output_bytes += output_len;
        st.final_queued = is_final;
        st.queue.push_back(Queued {
            frame,
            output_len,
            is_final,
        });
        drop(st);
        self.changed.notify_all();
    }

    /// Queues a message that is not agent output (never blocks).
    pub fn push(&self, msg: &GuestToHost) {
        self.enqueue(msg, 0, false);
    }

    /// Queues a chunk of agent output, first waiting while the queued output is over the cap
    /// (a chunk is always accepted into an empty queue).
    pub fn push_output(&self, stream: OutputStream, data: Vec<u8>) {
        let len = data.len();
        let mut st = self.lock();
        while st.output_bytes > 0 && st.output_bytes + len > self.cap && !st.final_queued {
            st = self.wait(st);
        }
        drop(st);
        self.enqueue(&GuestToHost::AgentOutput { stream, data }, len, false);
    }

    /// Queues the final `AgentExited`; later pushes are ignored.
    pub fn push_final(&self, status: ExitStatus) {
        self.enqueue(&GuestToHost::AgentExited { status }, 0, true);
    }

    /// Starts a session: its writer may take frames until [`Outbox::end_session`].
    pub fn begin_session(&self) -> u64 {
        let mut st = self.lock();
        st.generation += 1;
        st.active = true;
        st.generation
    }

    /// Ends session `generation`: its writer's [`Outbox::take`] returns `None`.
    pub fn end_session(&self, generation: u64) {
        let mut st = self.lock();
        if st.generation == generation {
            st.active = false;
        }
        drop(st);
        self.changed.notify_all();
    }

    fn session_live(st: &State, generation: u64) -> bool {
        st.active && st.generation == generation
    }

    /// Waits for the next frame for session `generation`; `None` once that session ended or
    /// after the final frame was written.
    pub fn take(&self, generation: u64) -> Option<Queued> {
        let mut st = self.lock();
        loop {
            if !Self::session_live(&st, generation) || st.final_written {
                return None;
            }
            if let Some(q) = st.queue.pop_front() {
                return Some(q);
            }
            st = self.wait(st);
        }
    }

    /// The frame from [`Outbox::take`] was written whole.
    pub fn commit(&self, q: Queued) {
        let mut st = self.lock();
        st.output_bytes -= q.output_len;
        st.final_written |= q.is_final;
        drop(st);
        self.changed.notify_all();
    }

    /// The frame from [`Outbox::take`] was not (or not wholly) written: send it again first.
    pub fn restore(&self, q: Queued) {
        self.lock().queue.push_front(q);
        self.changed.notify_all();
    }

    /// Whether the final `AgentExited` was written to a connection.
    pub fn final_written(&self) -> bool {
        self.lock().final_written
    }

    /// Waits up to `timeout` for session `generation` to end; `true` if it did.
    pub fn wait_session_end(&self, generation: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while Self::session_live(&st, generation) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_proto::frame::FrameDecoder;
    use std::sync::Arc;

    fn decode(frame: &[u8]) -> GuestToHost {
        let mut d = FrameDecoder::<GuestToHost>::new();
        d.push(frame);
        d.decode_next().unwrap().unwrap()
    }

    #[test]
    fn a_restored_frame_is_taken_again_first() {
        let outbox = Outbox::default();
        let g = outbox.begin_session();
        outbox.push(&GuestToHost::AgentStarted { pid: 7 });
        outbox.push_output(OutputStream::Stdout, b"hi".to_vec());
        let first = outbox.take(g).unwrap();
        outbox.restore(first);
        let again = outbox.take(g).unwrap();
        assert_eq!(decode(&again.frame), GuestToHost::AgentStarted { pid: 7 });
        outbox.commit(again);
        let out = outbox.take(g).unwrap();
        assert!(matches!(
            decode(&out.frame),
            GuestToHost::AgentOutput { .. }
        ));
    }

    #[test]
    fn nothing_is_queued_after_the_final_frame_and_take_stops_after_it() {
        let outbox = Outbox::default();
        let g = outbox.begin_session();
        outbox.push_final(ExitStatus::Exit(3));
        outbox.push(&GuestToHost::Error {
            message: "late".into(),
        });
        let fin = outbox.take(g).unwrap();
        assert!(fin.is_final);
        assert!(!outbox.final_written());
        outbox.commit(fin);
        assert!(outbox.final_written());
        assert!(outbox.take(g).is_none());
    }

    #[test]
    fn output_over_the_cap_waits_until_frames_are_written() {
        let outbox = Arc::new(Outbox::with_cap(10));
        let g = outbox.begin_session();
        outbox.push_output(OutputStream::Stdout, vec![1; 8]);
        let pusher = {
            let outbox = Arc::clone(&outbox);
            std::thread::spawn(move || outbox.push_output(OutputStream::Stderr, vec![2; 8]))
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!pusher.is_finished(), "the second chunk went over the cap");
        let q = outbox.take(g).unwrap();
        outbox.commit(q);
        pusher.join().unwrap();
        let q = outbox.take(g).unwrap();
        assert!(matches!(
            decode(&q.frame),
            GuestToHost::AgentOutput {
                stream: OutputStream::Stderr,
                ..
            }
        ));
    }

    #[test]
    fn ending_the_session_wakes_its_writer() {
        let outbox = Arc::new(Outbox::default());
        let g = outbox.begin_session();
        let taker = {
            let outbox = Arc::clone(&outbox);
            std::thread::spawn(move || outbox.take(g).is_none())
        };
        std::thread::sleep(Duration::from_millis(50));
        outbox.end_session(g);
        assert!(taker.join().unwrap());
        assert!(outbox.wait_session_end(g, Duration::ZERO));
        let g2 = outbox.begin_session();
        assert!(!outbox.wait_session_end(g2, Duration::from_millis(10)));
    }
}
