//! Pairing: the one-time code and the NNpsk0 handshake that pins the device's key.

use std::time::{Duration, Instant};

use shared_proto::credential::{self, PairingOffer, noise};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use super::link::{RecordReader, timed, write_record};
use super::state::write_private;
use super::{PairedDevice, Relay, RelayError};

/// How long a pairing code lives; the first attempt after that draws a new one.
pub const CODE_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// The wait after the first wrong code; each further one doubles it, up to [`MOST_WAIT`].
pub const FIRST_WAIT: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
pub const MOST_WAIT: Duration = Duration::from_secs(60);

/// When a pairing attempt may be made: the code's age and the wait after wrong codes.
///
/// A wrong code no longer voids the code (a guesser could then keep the user from ever
/// pairing); it makes the next attempt wait instead, so that guessing a 50-bit code stays
/// hopeless (at most about 60 guesses an hour once the wait has grown) while the user's own
/// attempt gets through within a minute.
#[derive(Debug, Clone, Copy)]
pub struct PairingGate {
    drawn: Instant,
    failures: u32,
    next_try: Option<Instant>,
}

/// Why a pairing attempt is not taken now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateRefusal {
    /// The code is older than [`CODE_LIFETIME`].
    Expired,
    /// Wait this long after the last wrong code.
    Wait(Duration),
}

impl PairingGate {
    /// A gate for a code drawn at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            drawn: now,
            failures: 0,
            next_try: None,
        }
    }

    /// Whether an attempt may be made at `now`.
    pub fn check(&self, now: Instant) -> Result<(), GateRefusal> {
        if now.saturating_duration_since(self.drawn) >= CODE_LIFETIME {
            return Err(GateRefusal::Expired);
        }
        match self.next_try {
            Some(at) if now < at => Err(GateRefusal::Wait(at - now)),
            _ => Ok(()),
        }
    }

    /// Records a wrong code at `now`.
    pub fn failed(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let wait = FIRST_WAIT
            .saturating_mul(1u32 << (self.failures - 1).min(16))
            .min(MOST_WAIT);
        self.next_try = Some(now + wait);
    }
}

impl Relay {
    /// The pending pairing code, while no device is paired.
    pub fn pairing_code(&self) -> Option<String> {
        self.lock().code.clone()
    }

    pub(super) async fn pair(&self, mut stream: TcpStream) -> Result<(), RelayError> {
        let Some(code) = self.pairing_code() else {
            return Err(RelayError::Refused("already paired"));
        };
        let gate = self.lock().gate.check(Instant::now());
        match gate {
            Ok(()) => {}
            Err(GateRefusal::Expired) => {
                self.new_code()?;
                tracing::warn!(
                    "the pairing code expired; a new one is in {}",
                    self.dir.join("pairing-code").display()
                );
                return Err(RelayError::Refused(
                    "the pairing code expired; a new one was drawn",
                ));
            }
            Err(GateRefusal::Wait(wait)) => {
                return Err(RelayError::PairingWait(wait.as_secs() + 1));
            }
        }
        let psk = Zeroizing::new(credential::pairing_psk(&code)?);
        let mut hs = noise::pair_responder(&psk)?;
        // The device sends nothing more before the answer: no byte is left behind.
        let first = timed(RecordReader::new(&mut stream).next()).await??;
        let payload = match noise::read_handshake(&mut hs, &first) {
            Ok(payload) => payload,
            Err(e) => {
                self.lock().gate.failed(Instant::now());
                return Err(RelayError::Noise(e));
            }
        };
        let offer: PairingOffer = credential::decode_message(&payload)?;
        let answer = credential::encode_message(&PairingOffer {
            static_public_key: self.public,
            name: self.name.clone(),
        })?;
        let message = noise::write_handshake(&mut hs, &answer)?;
        write_record(&mut stream, &message).await?;
        let device = PairedDevice {
            public_key: hex::encode(offer.static_public_key),
            name: offer.name,
        };
        let json = serde_json::to_vec_pretty(&device).map_err(|e| RelayError::File {
            op: "encode",
            path: self.dir.join("device.json"),
            source: std::io::Error::other(e),
        })?;
        write_private(&self.dir.join("device.json"), &json)?;
        let _ = std::fs::remove_file(self.dir.join("pairing-code"));
        let mut state = self.lock();
        state.device = Some((device.clone(), offer.static_public_key));
        state.code = None;
        tracing::info!(device = %device.name, key = %device.public_key, "paired");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding L5: wrong codes make the next attempt wait, doubling to a minute, and
    /// never void the code; the code itself lives an hour.
    #[test]
    fn wrong_codes_slow_the_next_attempt_and_never_void_the_code() {
        let t0 = Instant::now();
        let mut gate = PairingGate::new(t0);
        assert_eq!(gate.check(t0), Ok(()));
        gate.failed(t0);
        assert_eq!(gate.check(t0), Err(GateRefusal::Wait(FIRST_WAIT)));
        assert_eq!(gate.check(t0 + FIRST_WAIT), Ok(()));
        // Many wrong codes in a row: the wait grows to the cap and the code stays usable.
        let mut now = t0;
        for _ in 0..20 {
            now += MOST_WAIT;
            assert_eq!(gate.check(now), Ok(()), "the code is never voided");
            gate.failed(now);
        }
        assert_eq!(gate.check(now), Err(GateRefusal::Wait(MOST_WAIT)));
        assert!(
            gate.check(now + MOST_WAIT - Duration::from_millis(1))
                .is_err()
        );
        assert_eq!(gate.check(now + MOST_WAIT), Ok(()));
        // An hour after it was drawn, the code has expired.
        assert_eq!(gate.check(t0 + CODE_LIFETIME), Err(GateRefusal::Expired));
    }
}
