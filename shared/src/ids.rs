//! Domain identifiers. Each is a non-empty, bounded string that can only be built by parsing,
//! so code past the edge never re-checks emptiness or length.

use std::fmt;

/// Longest id accepted. Smartcar's ids are UUID-like (36 chars); anything much longer is not an id.
pub const MAX_ID_LEN: usize = 256;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("is empty")]
    Empty,
    #[error("is {0} bytes long, more than the {MAX_ID_LEN} allowed")]
    TooLong(usize),
    #[error("contains a control character")]
    Control,
}

fn check(s: &str) -> Result<(), IdError> {
    if s.trim().is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(s.len()));
    }
    if s.chars().any(char::is_control) {
        return Err(IdError::Control);
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Parses an id, rejecting empty, over-long or control-character strings.
            pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check(&s)?;
                Ok(Self(s))
            }

            /// The id as received.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// Smartcar's `eventId`: the same on every retry of one event, so it is the idempotency key.
    EventId
);
id_type!(
    /// A vehicle id (`vehicleId` or `data.vehicle.id`): opaque, not always a valid UUID.
    VehicleId
);
id_type!(
    /// A signal code, `lower(group)-lower(name)`, e.g. `tractionbattery-stateofcharge`.
    SignalCode
);

impl SignalCode {
    /// Builds the code from the legacy `"Group.Name"` form used in some error and trigger lists.
    pub fn from_group_name(s: &str) -> Result<Self, IdError> {
        match s.split_once('.') {
            Some((group, name)) => Self::parse(format!(
                "{}-{}",
                group.to_ascii_lowercase(),
                name.to_ascii_lowercase()
            )),
            None => Self::parse(s.to_ascii_lowercase()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_empty_long_and_control() {
        assert_eq!(EventId::parse(""), Err(IdError::Empty));
        assert_eq!(EventId::parse("  "), Err(IdError::Empty));
        assert_eq!(EventId::parse("x".repeat(300)), Err(IdError::TooLong(300)));
        assert_eq!(VehicleId::parse("a\nb"), Err(IdError::Control));
        assert_eq!(
            VehicleId::parse("v-1").map(|v| v.to_string()),
            Ok("v-1".into())
        );
    }

    #[test]
    fn signal_code_from_group_name() {
        assert_eq!(
            SignalCode::from_group_name("TractionBattery.StateOfCharge").map(|c| c.to_string()),
            Ok("tractionbattery-stateofcharge".to_string())
        );
    }
}
