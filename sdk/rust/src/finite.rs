//! The floats JSON has no form for (NaN, +infinity, -infinity), found in any value serde
//! serializes. serde_json writes each as `null`: a result of `{"score": NaN}` reached the
//! host as `{"score": null}` until 2026-12-07, a different answer and no word of it.
//!
//! [`first_non_finite`] walks the value as a serde serializer that writes nothing;
//! `Json::encode` runs it only when serde_json wrote a `null` (its formatter notes it),
//! the one form it gives such a float, so a result without `null` costs nothing more.

use std::fmt;

use serde::ser::{self, Serialize};

/// The first NaN or infinite `f64` or `f32` in `value`, if it has one. A map's keys are
/// not looked at: serde_json refuses a non-finite key itself.
pub(crate) fn first_non_finite<T: Serialize + ?Sized>(value: &T) -> Option<f64> {
    match value.serialize(Finder) {
        Err(Stop::Found(number)) => Some(number),
        // A value that serialized once and now fails (a Serialize impl that varies) has
        // shown no such float: serde_json's output stands.
        Ok(()) | Err(Stop::Failed) => None,
    }
}

/// Why the walk stopped early.
#[derive(Debug)]
enum Stop {
    Found(f64),
    Failed,
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stop::Found(_) => "a float JSON has no form for",
            Stop::Failed => "the value failed to serialize",
        })
    }
}

impl std::error::Error for Stop {}

impl ser::Error for Stop {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Stop::Failed
    }
}

fn float(number: f64) -> Result<(), Stop> {
    if number.is_finite() {
        Ok(())
    } else {
        Err(Stop::Found(number))
    }
}

/// A serializer that writes nothing and stops at the first non-finite float.
#[derive(Clone, Copy)]
struct Finder;

/// Methods of [`Finder`] for what holds no float.
macro_rules! holds_no_float {
    ($($method:ident($($argument:ty),*);)*) => {
        $(fn $method(self, $(_: $argument),*) -> Result<(), Stop> { Ok(()) })*
    };
}

/// Methods of [`Finder`] for a compound: it walks itself.
macro_rules! walks_itself {
    ($($method:ident($($argument:ty),*) -> $kind:ty;)*) => {
        $(fn $method(self, $(_: $argument),*) -> Result<$kind, Stop> { Ok(self) })*
    };
}

impl ser::Serializer for Finder {
    type Ok = ();
    type Error = Stop;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn serialize_f32(self, number: f32) -> Result<(), Stop> {
        float(f64::from(number))
    }

    fn serialize_f64(self, number: f64) -> Result<(), Stop> {
        float(number)
    }

    holds_no_float! {
        serialize_bool(bool);
        serialize_i8(i8);
        serialize_i16(i16);
        serialize_i32(i32);
        serialize_i64(i64);
        serialize_i128(i128);
        serialize_u8(u8);
        serialize_u16(u16);
        serialize_u32(u32);
        serialize_u64(u64);
        serialize_u128(u128);
        serialize_char(char);
        serialize_str(&str);
        serialize_bytes(&[u8]);
        serialize_none();
        serialize_unit();
        serialize_unit_struct(&'static str);
        serialize_unit_variant(&'static str, u32, &'static str);
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Stop> {
        value.serialize(self)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Stop> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> Result<(), Stop> {
        value.serialize(self)
    }

    walks_itself! {
        serialize_seq(Option<usize>) -> Self;
        serialize_tuple(usize) -> Self;
        serialize_tuple_struct(&'static str, usize) -> Self;
        serialize_tuple_variant(&'static str, u32, &'static str, usize) -> Self;
        serialize_map(Option<usize>) -> Self;
        serialize_struct(&'static str, usize) -> Self;
        serialize_struct_variant(&'static str, u32, &'static str, usize) -> Self;
    }
}

/// The compound serializers of [`Finder`]: each element or field is walked in turn.
macro_rules! compound {
    ($($kind:ident::$method:ident($($name:ty),*);)*) => {
        $(impl ser::$kind for Finder {
            type Ok = ();
            type Error = Stop;

            fn $method<T: Serialize + ?Sized>(&mut self, $(_: $name,)* value: &T) -> Result<(), Stop> {
                value.serialize(*self)
            }

            fn end(self) -> Result<(), Stop> {
                Ok(())
            }
        })*
    };
}

compound! {
    SerializeSeq::serialize_element();
    SerializeTuple::serialize_element();
    SerializeTupleStruct::serialize_field();
    SerializeTupleVariant::serialize_field();
    SerializeStruct::serialize_field(&'static str);
    SerializeStructVariant::serialize_field(&'static str);
}

impl ser::SerializeMap for Finder {
    type Ok = ();
    type Error = Stop;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, _: &T) -> Result<(), Stop> {
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Stop> {
        value.serialize(*self)
    }

    fn end(self) -> Result<(), Stop> {
        Ok(())
    }
}
