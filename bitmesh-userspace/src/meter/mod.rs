//! Load, attach, pin, read and credit the kernel maps: the only code that touches aya.
//!
//! ```no_run
//! # fn demo() -> Result<(), bitmesh::meter::MeterError> {
//! use bitmesh::meter::{Meter, MeterConfig, UploadHook};
//! use bitmesh_common::{kernel::Mac, pricing::ByteCount};
//!
//! let config = MeterConfig::new(std::net::Ipv4Addr::new(10, 0, 0, 1)); // gateway on wlan0
//! let mut meter = Meter::load(&config)?;          // verify programs, open/create pinned maps
//! meter.attach("wlan0", UploadHook::Auto)?;        // upload hook + TC egress
//! let mac = Mac([2, 0, 0, 0, 0, 1]);
//! meter.maps_mut().add_client(mac)?;
//! meter.maps_mut().raise_credit(mac, ByteCount(10 << 20))?;
//! let usage = meter.maps().usage(mac)?;
//! # let _ = usage; Ok(()) }
//! ```
//!
//! Maps are pinned under [`MeterConfig::pin_dir`] (default `/sys/fs/bpf/bitmesh`) and
//! the attachments are pinned there too, so enforcement and counters survive a
//! controller restart; [`Meter::load`] + [`Meter::attach`] after a restart reuse both.
//! [`MeterMaps::open_pinned`] reads the maps without loading anything (CLI, tests).

mod attach;
mod config;
mod error;
mod maps;
mod object;
mod testrun;

pub use attach::{Meter, MeterProgram};
pub use config::{
    default_garden_limits, MeterConfig, UploadHook, DEFAULT_PIN_DIR, GARDEN_PAYMENT_BURST,
    GARDEN_PAYMENT_RATE, GARDEN_SERVICES_BURST, GARDEN_SERVICES_RATE,
};
pub use error::MeterError;
pub use maps::{Binding, ClientUsage, MeterMaps, MeterStats};
pub use testrun::{SkbContext, TestRunOutcome};

pub use bitmesh_common::kernel::{Direction, Mac, StatCounter, Usage, Verdict};
