//! The contract's closed vocabularies. Each enum's discriminant is its code in Arrow dictionary
//! columns (the key of `Dictionary(UInt8, Utf8)`), so `ALL[code]` is the value and the order of
//! variants is part of the on-disk format: append, never reorder.

macro_rules! contract_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[repr(u8)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every value, in code order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// Every value's contract text, in code order (the dictionary of Arrow columns).
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The contract text.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// The value for a contract text (exact, case-sensitive, as the contract spells it).
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }

            /// The value for a dictionary code.
            pub fn from_code(code: u8) -> Option<Self> {
                Self::ALL.get(usize::from(code)).copied()
            }

            /// The dictionary code.
            pub const fn code(self) -> u8 {
                self as u8
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

contract_enum! {
    /// What a message attempt tries to do.
    Action {
        /// Connect to a broker (no target).
        Connect = "connect",
        /// Discover the target.
        Discover = "discover",
        /// Send a message to the target.
        Send = "send",
        /// Receive a message from the target.
        Receive = "receive",
        /// Subscribe to the target's messages.
        Subscribe = "subscribe",
        /// Change the target's configuration.
        Configure = "configure",
    }
}

contract_enum! {
    /// How the requester's own UUID+token or certificate checked out.
    Auth {
        /// Credentials valid.
        Valid = "valid",
        /// Credentials presented but wrong.
        Invalid = "invalid",
        /// No credentials presented.
        Missing = "missing",
    }
}

contract_enum! {
    /// Kind of an interaction-table entry.
    InteractionKind {
        /// Physical proximity.
        Proximity = "proximity",
        /// SMS.
        Sms = "sms",
        /// MMS.
        Mms = "mms",
        /// Voice call.
        Call = "call",
        /// Email.
        Email = "email",
        /// Platform message.
        Message = "message",
    }
}

contract_enum! {
    /// Kind of a registered UUID.
    RegistryKind {
        /// A device.
        Device = "device",
        /// A person.
        Person = "person",
        /// A system.
        System = "system",
        /// A gateway.
        Gateway = "gateway",
        /// A messaging system.
        MessagingSystem = "messaging_system",
    }
}

contract_enum! {
    /// Kind of a finding.
    FindingKind {
        /// The requester is not registered.
        UnregisteredRequester = "unregistered_requester",
        /// The requester's own credentials did not check out.
        BadCredentials = "bad_credentials",
        /// A permissions record or profile refused the attempt.
        PermissionDenied = "permission_denied",
        /// Outside every allowed time window.
        TimingRestriction = "timing_restriction",
        /// Location restriction broken.
        LocationRestriction = "location_restriction",
        /// Message-envelope restriction broken.
        EnvelopeRestriction = "envelope_restriction",
        /// Path restriction broken.
        PathRestriction = "path_restriction",
        /// Presence restriction broken.
        PresenceRestriction = "presence_restriction",
        /// A throttle was exceeded.
        ThrottleExceeded = "throttle_exceeded",
        /// Unusual timing against a learned schedule.
        TimingAnomaly = "timing_anomaly",
        /// An identity request's interaction cross-check failed.
        CrossCheckFailed = "cross_check_failed",
        /// An attempt by a blocked or unregistered UUID.
        BlockedRequester = "blocked_requester",
    }
}

contract_enum! {
    /// Severity of a finding.
    Severity {
        /// Low.
        Low = "low",
        /// Medium.
        Medium = "medium",
        /// High.
        High = "high",
    }
}

contract_enum! {
    /// Enforcement state of a UUID.
    EnforcementStateKind {
        /// Not restricted.
        Active = "active",
        /// Blocked until `until`.
        Blocked = "blocked",
        /// Unregistered, no expiry.
        Unregistered = "unregistered",
    }
}

contract_enum! {
    /// Outcome of an identity request.
    Outcome {
        /// Enough peers confirmed the device's interactions.
        Confirmed = "confirmed",
        /// Confirmation can no longer be reached with the available peers.
        Denied = "denied",
        /// Neither.
        InsufficientEvidence = "insufficient_evidence",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_agree() {
        for (i, a) in Action::ALL.iter().enumerate() {
            assert_eq!(usize::from(a.code()), i);
            assert_eq!(Action::parse(Action::NAMES[i]), Some(*a));
            assert_eq!(Action::from_code(a.code()), Some(*a));
        }
        assert_eq!(FindingKind::ALL.len(), 12);
        assert_eq!(Action::parse("Send"), None);
        assert_eq!(serde_json::to_string(&FindingKind::BadCredentials).ok().as_deref(), Some("\"bad_credentials\""));
    }
}
