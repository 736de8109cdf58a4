//! The captive portal (docs/design.md section 5.8): what an unpaid phone sees.
//!
//! * [`redirect`]: the listener the kernel + nftables send an unpaid client's plain
//!   HTTP to; it answers every request with a redirect to the page.
//! * [`nft`]: the controller's own nftables table (DNAT of marked port 80, reset of
//!   marked port 443, drop of anything else marked), installed and removed by
//!   `bitmesh run`.
//! * [`page`]: the page itself (HTML, CSS, JS and the string table embedded in the
//!   binary), served on the API port at the RFC 8908 `user-portal-url`, and the
//!   invoice QR code rendered by the server ([`qr`]).
//! * [`tls`]: HTTPS for the API and the page when the operator has a certificate.

pub mod nft;
pub mod page;
mod qr;
pub mod redirect;
pub mod tls;

pub use nft::{NftError, NftTable};
pub use page::PageConfig;
pub use tls::TlsError;
