//! A current (non-legacy) event read straight from its bytes into the few structures
//! [`super::Event::parse`] reads, instead of a whole `serde_json::Value` tree.
//!
//! Only the signals' bodies, `meta` timestamps and `data.errors[]` entries become `Value`s (the
//! state stores them as sent); strings are borrowed from the body where they have no escapes; every
//! other value is passed over without being built. Each field keeps whether it was absent or
//! `null`, of the type the parse expects, or of another type ([`Field`]), so the parse names the
//! same field with the same error as it did reading a `Value` tree, and a repeated key keeps its
//! last value, as a `Value` map does.
//!
//! Where the two differ, on purpose: a value the parse never reads is only checked for syntax, so a
//! number out of `f64` range, invalid UTF-8 in a string, or nesting deeper than serde_json's limit
//! there no longer fails the event (the tests in `super` name these cases).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// A field as sent: absent or `null`, of the type the parse expects, or of another type.
#[derive(Debug, Default)]
pub(super) enum Field<T> {
    #[default]
    Absent,
    Got(T),
    Wrong,
}

impl<T> Field<T> {
    /// The value when it has the expected type; absent, `null` and other types are `None`
    /// (for fields the parse reads leniently).
    pub(super) fn lenient(self) -> Option<T> {
        match self {
            Self::Got(v) => Some(v),
            Self::Absent | Self::Wrong => None,
        }
    }
}

/// What a [`Field`] expects, and how it is built from each JSON kind. A kind it does not accept
/// is passed over and makes the field [`Field::Wrong`].
pub(super) trait Shape<'de>: Sized {
    /// How an error names the expected type: "a string", "an object", "an array".
    const EXPECTED: &'static str;

    fn from_str(_: Cow<'de, str>) -> Option<Self> {
        None
    }

    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

impl<'de> Shape<'de> for Cow<'de, str> {
    const EXPECTED: &'static str = "a string";

    fn from_str(s: Cow<'de, str>) -> Option<Self> {
        Some(s)
    }
}

impl<'de, T: Deserialize<'de>> Shape<'de> for Vec<T> {
    const EXPECTED: &'static str = "an array";

    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(item) = seq.next_element()? {
            out.push(item);
        }
        Ok(Some(out))
    }
}

impl<'de, T: Shape<'de>> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor(PhantomData))
    }
}

struct FieldVisitor<T>(PhantomData<T>);

impl<'de, T: Shape<'de>> Visitor<'de> for FieldVisitor<T> {
    type Value = Field<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Field<T>, E> {
        Ok(Field::Absent)
    }

    fn visit_none<E>(self) -> Result<Field<T>, E> {
        Ok(Field::Absent)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Field<T>, D::Error> {
        Field::deserialize(d)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Field<T>, E> {
        Ok(Field::Wrong)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Field<T>, E> {
        Ok(Field::Wrong)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Field<T>, E> {
        Ok(Field::Wrong)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Field<T>, E> {
        Ok(Field::Wrong)
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Field<T>, E> {
        Ok(T::from_str(Cow::Borrowed(s)).map_or(Field::Wrong, Field::Got))
    }

    fn visit_str<E>(self, s: &str) -> Result<Field<T>, E> {
        Ok(T::from_str(Cow::Owned(s.to_owned())).map_or(Field::Wrong, Field::Got))
    }

    fn visit_string<E>(self, s: String) -> Result<Field<T>, E> {
        Ok(T::from_str(Cow::Owned(s)).map_or(Field::Wrong, Field::Got))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Field<T>, A::Error> {
        Ok(T::from_map(map)?.map_or(Field::Wrong, Field::Got))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Field<T>, A::Error> {
        Ok(T::from_seq(seq)?.map_or(Field::Wrong, Field::Got))
    }
}

/// An object key, borrowed from the body when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }

            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }

            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }

            fn visit_string<E>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// An object whose listed keys are read into fields (a repeated key keeps its last value) and
/// whose other keys are passed over.
macro_rules! wire_object {
    ($(#[$doc:meta])* $name:ident $(<$lt:lifetime>)? { $($field:ident: $ty:ty = $key:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Default)]
        pub(super) struct $name $(<$lt>)? {
            $(pub(super) $field: $ty,)*
        }

        impl<'de> Shape<'de> for $name $(<$lt>)? {
            const EXPECTED: &'static str = "an object";

            fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
                let mut out = Self::default();
                while let Some(Key(key)) = map.next_key()? {
                    match key.as_ref() {
                        $($key => out.$field = map.next_value()?,)*
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Some(out))
            }
        }
    };
}

pub(super) type Str<'de> = Field<Cow<'de, str>>;

wire_object!(
    /// The top level of an event.
    Root<'de> {
        event_type: Str<'de> = "eventType",
        event_id: Str<'de> = "eventId",
        event_name: Str<'de> = "eventName",
        version: Str<'de> = "version",
        vehicle_id: Str<'de> = "vehicleId",
        data: Field<Data<'de>> = "data",
        meta: Field<Meta<'de>> = "meta",
    }
);

wire_object!(
    /// `data`.
    Data<'de> {
        vehicle: Field<WithId<'de>> = "vehicle",
        user: Field<WithId<'de>> = "user",
        signals: Field<Vec<Field<Signal<'de>>>> = "signals",
        errors: Field<Vec<Value>> = "errors",
    }
);

wire_object!(
    /// `data.vehicle` and `data.user`.
    WithId<'de> {
        id: Str<'de> = "id",
    }
);

wire_object!(
    /// The top-level `meta`.
    Meta<'de> {
        delivery_id: Str<'de> = "deliveryId",
        delivered_at: Option<Value> = "deliveredAt",
        mode: Str<'de> = "mode",
        version: Str<'de> = "version",
        source: Str<'de> = "source",
    }
);

wire_object!(
    /// One entry of `data.signals[]`.
    Signal<'de> {
        code: Str<'de> = "code",
        group: Str<'de> = "group",
        name: Str<'de> = "name",
        status: Field<Status<'de>> = "status",
        meta: Field<SignalMeta> = "meta",
        body: Option<Value> = "body",
    }
);

wire_object!(
    /// `data.signals[].status`.
    Status<'de> {
        value: Str<'de> = "value",
        error: Field<StatusError<'de>> = "error",
    }
);

wire_object!(
    /// `data.signals[].status.error`.
    StatusError<'de> {
        error_type: Str<'de> = "type",
        code: Str<'de> = "code",
    }
);

wire_object!(
    /// `data.signals[].meta`.
    SignalMeta {
        oem_updated_at: Option<Value> = "oemUpdatedAt",
        fetched_at: Option<Value> = "fetchedAt",
        retrieved_at: Option<Value> = "retrievedAt",
    }
);

impl Root<'_> {
    /// The legacy v2 shape: `eventName` without `eventType`, or a top-level `version` "2…".
    /// A non-string `eventName` is an error on any body.
    pub(super) fn is_legacy_shape(&self) -> Result<bool, super::EventError> {
        if matches!(self.event_name, Field::Wrong) {
            return Err(super::EventError::WrongType {
                field: "eventName".into(),
                expected: "a string",
            });
        }
        let named =
            matches!(self.event_name, Field::Got(_)) && matches!(self.event_type, Field::Absent);
        let v2 = matches!(&self.version, Field::Got(v) if v.starts_with('2'));
        Ok(named || v2)
    }
}
