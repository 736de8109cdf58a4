//! Placeholder: see lib.rs for this module's job.
