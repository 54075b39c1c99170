//! Device counters: one macro declares a device's atomic counters and the plain snapshot of them
//! that goes into `exit.json`, so the two lists cannot drift apart.
//!
//! Counters are `Relaxed` atomics: each is a tally read once at the end (or by a test), never a
//! value other memory depends on.

/// Declares `pub struct $name` of `AtomicU64` counters (with `inc`, `add`, `get` and
/// `snapshot`) and `pub struct $snap` holding the same fields as `u64`, serializable.
macro_rules! device_metrics {
    (
        $(#[$meta:meta])*
        pub struct $name:ident => $snap:ident {
            $( $(#[$fmeta:meta])* $field:ident, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: ::std::sync::atomic::AtomicU64, )*
        }

        impl $name {
            /// Adds one to `counter`.
            pub fn inc(counter: &::std::sync::atomic::AtomicU64) {
                counter.fetch_add(1, ::std::sync::atomic::Ordering::Relaxed);
            }

            /// Adds `n` to `counter`.
            pub fn add(counter: &::std::sync::atomic::AtomicU64, n: u64) {
                counter.fetch_add(n, ::std::sync::atomic::Ordering::Relaxed);
            }

            /// Reads `counter`.
            pub fn get(counter: &::std::sync::atomic::AtomicU64) -> u64 {
                counter.load(::std::sync::atomic::Ordering::Relaxed)
            }

            /// The counters' current values.
            pub fn snapshot(&self) -> $snap {
                $snap { $( $field: Self::get(&self.$field), )* }
            }
        }

        #[doc = concat!("[`", stringify!($name), "`] at one moment, as written into `exit.json`.")]
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
        pub struct $snap {
            $( $(#[$fmeta])* pub $field: u64, )*
        }
    };
}

pub(crate) use device_metrics;
