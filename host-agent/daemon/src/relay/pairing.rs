//! Pairing: the one-time code and the NNpsk0 handshake that pins the device's key.

use shared_proto::credential::{self, PairingOffer, noise};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use super::link::{RecordReader, timed, write_record};
use super::state::write_private;
use super::{MAX_PAIRING_FAILURES, PairedDevice, Relay, RelayError};

impl Relay {
    /// The pending pairing code, while no device is paired.
    pub fn pairing_code(&self) -> Option<String> {
        self.lock().code.clone()
    }

    pub(super) async fn pair(&self, mut stream: TcpStream) -> Result<(), RelayError> {
        let Some(code) = self.pairing_code() else {
            return Err(RelayError::Refused("already paired"));
        };
        let psk = Zeroizing::new(credential::pairing_psk(&code)?);
        let mut hs = noise::pair_responder(&psk)?;
        // The device sends nothing more before the answer: no byte is left behind.
        let first = timed(RecordReader::new(&mut stream).next()).await??;
        let payload = match noise::read_handshake(&mut hs, &first) {
            Ok(payload) => payload,
            Err(e) => {
                let void = {
                    let mut state = self.lock();
                    state.failures += 1;
                    state.failures >= MAX_PAIRING_FAILURES
                };
                if void {
                    tracing::warn!("too many wrong pairing codes; drawing a new one");
                    self.new_code()?;
                }
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
