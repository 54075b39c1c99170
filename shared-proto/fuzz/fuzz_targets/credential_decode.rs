//! Feeds arbitrary bytes to every credential-channel decoder: records, link messages, the relay
//! greeting, the proxy messages and the bulk messages' own readers. Each must answer a value or
//! a typed error without a panic, and whatever decodes must encode again and decode to the same
//! value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_proto::credential::data as bulk;
use shared_proto::credential::{
    DeviceToHost, DeviceToSidecar, HostToDevice, PairingOffer, RecordDecoder, RelayGreeting,
    SidecarToDevice, Validate, decode_message, encode_message,
};

fn round_trip<T>(data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + Validate + PartialEq + std::fmt::Debug,
{
    if let Ok(msg) = decode_message::<T>(data) {
        let again = encode_message(&msg).expect("a decoded message encodes");
        assert_eq!(decode_message::<T>(&again).expect("and decodes"), msg);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut records = RecordDecoder::new();
    records.push(data);
    while let Ok(Some(_)) = records.decode_next() {}
    round_trip::<HostToDevice>(data);
    round_trip::<DeviceToHost>(data);
    round_trip::<RelayGreeting>(data);
    round_trip::<SidecarToDevice>(data);
    round_trip::<DeviceToSidecar>(data);
    round_trip::<PairingOffer>(data);
    // The bulk messages' readers agree with the general decoder whenever they answer.
    if let Some(bytes) = bulk::body_bytes(data) {
        let body = decode_message::<DeviceToSidecar>(data).expect("the general decoder agrees");
        assert_eq!(body, DeviceToSidecar::Body(bytes.to_vec()));
    }
    if let Some((session, bytes)) = bulk::link_data(data) {
        let msg = decode_message::<HostToDevice>(data).expect("the general decoder agrees");
        assert_eq!(
            msg,
            HostToDevice::Data {
                session,
                bytes: bytes.to_vec()
            }
        );
    }
});
