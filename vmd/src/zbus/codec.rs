//! msgpack as Go's `vmihailenco/msgpack` v4 writes it, and lenient decoding.
//!
//! Encoding is a serde [`Serializer`] rather than `rmp_serde::to_vec` because
//! Go writes integers at the *fixed width of their Go type* (`uint8` as
//! `cc xx`, `uint64` as `cf` + 8 bytes, `int64` as `d3` + 8 bytes) while
//! rmp-serde picks the smallest form. Both decode fine on the Go side, but the
//! replies of this server are meant to be byte-equal to what the Go server
//! sends, so that captures of the two can be compared directly.
//!
//! Mapping from Rust to the wire, chosen to mirror the Go type of each field:
//! `u8/u16/u32/u64` → `cc/cd/ce/cf`, `i8/i16/i32/i64` → `d0/d1/d2/d3`,
//! structs → maps keyed by field name, `Option::None` and `()` → nil,
//! byte buffers (`serde_bytes`) → bin, [`GoTime`] → timestamp extension −1.
//!
//! Decoding goes through rmp-serde, which already accepts any integer width
//! and structs encoded as arrays; [`nil_default`] makes nil acceptable for
//! every field, as the Go decoder does.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer};
use serde::ser::{self, Serialize, Serializer};

/// Name of the newtype a [`GoTime`] hands to the serializer so that
/// [`GoEncoder`] can recognise it and write a msgpack extension.
const GO_TIME_TOKEN: &str = "$vmd::GoTime";
/// The msgpack extension type Go uses for `time.Time`.
const TIME_EXT: i8 = -1;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("cannot encode to msgpack: {0}")]
    Custom(String),
}

impl ser::Error for EncodeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        EncodeError::Custom(msg.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot decode msgpack: {0}")]
pub struct DecodeError(#[from] rmp_serde::decode::Error);

/// Encodes `value` the way the Go zbus encoder would.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(128);
    value.serialize(&mut GoEncoder { out: &mut out })?;
    Ok(out)
}

/// Decodes `bytes` leniently (see the module doc).
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DecodeError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

/// `deserialize_with` helper: msgpack nil decodes to `T::default()`.
///
/// Go encodes nil slices, maps and pointers as nil, and callers may send nil
/// for a string too; every field of every wire type goes through this.
pub fn nil_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A Go `time.Time`: seconds and nanoseconds since the Unix epoch (UTC).
///
/// On msgpack it is the timestamp extension (−1) in its 4, 8 or 12 byte form,
/// chosen exactly as Go does; in human-readable formats (JSON for the
/// operator CLI) it is an RFC 3339 string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoTime {
    pub secs: i64,
    pub nanos: u32,
}

impl Default for GoTime {
    /// Go's zero `time.Time` (0001-01-01T00:00:00Z), which is what a Go
    /// decoder produces for a missing key.
    fn default() -> Self {
        GoTime::ZERO
    }
}

impl GoTime {
    pub const ZERO: GoTime = GoTime {
        secs: -62_135_596_800,
        nanos: 0,
    };

    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        GoTime {
            secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: d.subsec_nanos(),
        }
    }

    /// The extension payload, in the smallest form that holds the value.
    fn ext_payload(&self) -> Vec<u8> {
        if (self.secs as u64) >> 34 == 0 {
            let data = (u64::from(self.nanos) << 34) | self.secs as u64;
            if data & 0xffff_ffff_0000_0000 == 0 {
                (data as u32).to_be_bytes().to_vec()
            } else {
                data.to_be_bytes().to_vec()
            }
        } else {
            let mut b = Vec::with_capacity(12);
            b.extend_from_slice(&self.nanos.to_be_bytes());
            b.extend_from_slice(&self.secs.to_be_bytes());
            b
        }
    }

    fn from_ext_payload(b: &[u8]) -> Option<Self> {
        match b.len() {
            4 => Some(GoTime {
                secs: i64::from(u32::from_be_bytes(b.try_into().ok()?)),
                nanos: 0,
            }),
            8 => {
                let data = u64::from_be_bytes(b.try_into().ok()?);
                Some(GoTime {
                    secs: (data & 0x3_ffff_ffff) as i64,
                    nanos: (data >> 34) as u32,
                })
            }
            12 => Some(GoTime {
                nanos: u32::from_be_bytes(b[..4].try_into().ok()?),
                secs: i64::from_be_bytes(b[4..].try_into().ok()?),
            }),
            _ => None,
        }
    }

    fn to_offset_date_time(self) -> Option<time::OffsetDateTime> {
        let t = time::OffsetDateTime::from_unix_timestamp(self.secs).ok()?;
        Some(t + time::Duration::nanoseconds(i64::from(self.nanos)))
    }

    pub fn to_rfc3339(self) -> String {
        self.to_offset_date_time()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| format!("@{}.{:09}", self.secs, self.nanos))
    }

    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        let t =
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
        Some(GoTime {
            secs: t.unix_timestamp(),
            nanos: t.nanosecond(),
        })
    }
}

impl Serialize for GoTime {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&self.to_rfc3339())
        } else {
            serializer.serialize_newtype_struct(
                GO_TIME_TOKEN,
                serde_bytes::Bytes::new(&self.ext_payload()),
            )
        }
    }
}

impl<'de> Deserialize<'de> for GoTime {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = GoTime;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a msgpack timestamp extension or an RFC 3339 string")
            }
            fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<GoTime, D::Error> {
                let (kind, payload): (i8, serde_bytes::ByteBuf) = Deserialize::deserialize(d)?;
                if kind != TIME_EXT {
                    return Err(de::Error::custom(format!(
                        "extension type {kind} is not a timestamp"
                    )));
                }
                GoTime::from_ext_payload(&payload)
                    .ok_or_else(|| de::Error::custom("timestamp of invalid length"))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<GoTime, E> {
                GoTime::parse_rfc3339(s).ok_or_else(|| E::custom("invalid RFC 3339 time"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<GoTime, E> {
                Ok(GoTime::ZERO)
            }
            fn visit_none<E: de::Error>(self) -> Result<GoTime, E> {
                Ok(GoTime::ZERO)
            }
        }
        // rmp-serde hands an extension to `deserialize_any` as a newtype; the
        // same call lets an RFC 3339 string or nil through.
        deserializer.deserialize_any(V)
    }
}

/// The Go-flavoured msgpack serializer.
pub struct GoEncoder<'a> {
    out: &'a mut Vec<u8>,
}

// Writes into a Vec never fail; the Result only exists for the io::Write API.
fn io<T, E: fmt::Debug>(r: Result<T, E>) -> Result<T, EncodeError> {
    r.map_err(|e| EncodeError::Custom(format!("{e:?}")))
}

fn len_u32(len: Option<usize>) -> Result<u32, EncodeError> {
    let len = len.ok_or_else(|| EncodeError::Custom("sequence of unknown length".into()))?;
    u32::try_from(len).map_err(|_| EncodeError::Custom("sequence longer than 2^32".into()))
}

impl<'a, 'b> Serializer for &'a mut GoEncoder<'b> {
    type Ok = ();
    type Error = EncodeError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn is_human_readable(&self) -> bool {
        false
    }

    fn serialize_bool(self, v: bool) -> Result<(), EncodeError> {
        io(rmp::encode::write_bool(self.out, v))
    }
    fn serialize_i8(self, v: i8) -> Result<(), EncodeError> {
        io(rmp::encode::write_i8(self.out, v))
    }
    fn serialize_i16(self, v: i16) -> Result<(), EncodeError> {
        io(rmp::encode::write_i16(self.out, v))
    }
    fn serialize_i32(self, v: i32) -> Result<(), EncodeError> {
        io(rmp::encode::write_i32(self.out, v))
    }
    fn serialize_i64(self, v: i64) -> Result<(), EncodeError> {
        io(rmp::encode::write_i64(self.out, v))
    }
    fn serialize_u8(self, v: u8) -> Result<(), EncodeError> {
        io(rmp::encode::write_u8(self.out, v))
    }
    fn serialize_u16(self, v: u16) -> Result<(), EncodeError> {
        io(rmp::encode::write_u16(self.out, v))
    }
    fn serialize_u32(self, v: u32) -> Result<(), EncodeError> {
        io(rmp::encode::write_u32(self.out, v))
    }
    fn serialize_u64(self, v: u64) -> Result<(), EncodeError> {
        io(rmp::encode::write_u64(self.out, v))
    }
    fn serialize_f32(self, v: f32) -> Result<(), EncodeError> {
        io(rmp::encode::write_f32(self.out, v))
    }
    fn serialize_f64(self, v: f64) -> Result<(), EncodeError> {
        io(rmp::encode::write_f64(self.out, v))
    }
    fn serialize_char(self, v: char) -> Result<(), EncodeError> {
        self.serialize_str(v.encode_utf8(&mut [0; 4]))
    }
    fn serialize_str(self, v: &str) -> Result<(), EncodeError> {
        io(rmp::encode::write_str(self.out, v))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), EncodeError> {
        io(rmp::encode::write_bin(self.out, v))
    }
    fn serialize_none(self) -> Result<(), EncodeError> {
        io(rmp::encode::write_nil(self.out))
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), EncodeError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), EncodeError> {
        io(rmp::encode::write_nil(self.out))
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), EncodeError> {
        self.serialize_unit()
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<(), EncodeError> {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        if name == GO_TIME_TOKEN {
            // The payload was handed over as bytes; write it as ext −1.
            let mut payload = Vec::with_capacity(12);
            value.serialize(&mut GoEncoder { out: &mut payload })?;
            let bytes: serde_bytes::ByteBuf = decode(&payload)
                .map_err(|e| EncodeError::Custom(format!("timestamp payload: {e}")))?;
            let len = u32::try_from(bytes.len())
                .map_err(|_| EncodeError::Custom("timestamp payload too long".into()))?;
            io(rmp::encode::write_ext_meta(self.out, len, TIME_EXT))?;
            self.out.extend_from_slice(&bytes);
            return Ok(());
        }
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        io(rmp::encode::write_map_len(self.out, 1))?;
        self.serialize_str(variant)?;
        value.serialize(self)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Self, EncodeError> {
        io(rmp::encode::write_array_len(self.out, len_u32(len)?))?;
        Ok(self)
    }
    fn serialize_tuple(self, len: usize) -> Result<Self, EncodeError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<Self, EncodeError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self, EncodeError> {
        io(rmp::encode::write_map_len(self.out, 1))?;
        self.serialize_str(variant)?;
        self.serialize_seq(Some(len))
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Self, EncodeError> {
        io(rmp::encode::write_map_len(self.out, len_u32(len)?))?;
        Ok(self)
    }
    fn serialize_struct(self, _: &'static str, len: usize) -> Result<Self, EncodeError> {
        self.serialize_map(Some(len))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self, EncodeError> {
        io(rmp::encode::write_map_len(self.out, 1))?;
        self.serialize_str(variant)?;
        self.serialize_map(Some(len))
    }
}

macro_rules! compound {
    ($($trait:ident :: $method:ident),*) => {$(
        impl<'a, 'b> ser::$trait for &'a mut GoEncoder<'b> {
            type Ok = ();
            type Error = EncodeError;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
                value.serialize(&mut **self)
            }
            fn end(self) -> Result<(), EncodeError> {
                Ok(())
            }
        }
    )*};
}
compound!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl<'a, 'b> ser::SerializeMap for &'a mut GoEncoder<'b> {
    type Ok = ();
    type Error = EncodeError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), EncodeError> {
        key.serialize(&mut **self)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), EncodeError> {
        Ok(())
    }
}

macro_rules! structs {
    ($($trait:ident),*) => {$(
        impl<'a, 'b> ser::$trait for &'a mut GoEncoder<'b> {
            type Ok = ();
            type Error = EncodeError;
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), EncodeError> {
                io(rmp::encode::write_str(self.out, key))?;
                value.serialize(&mut **self)
            }
            fn end(self) -> Result<(), EncodeError> {
                Ok(())
            }
        }
    )*};
}
structs!(SerializeStruct, SerializeStructVariant);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_keep_their_go_width() {
        assert_eq!(encode(&2u8).unwrap(), [0xcc, 2]);
        assert_eq!(encode(&1u64).unwrap(), [0xcf, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(encode(&-1i64).unwrap()[0], 0xd3);
    }

    #[test]
    fn time_forms_match_go() {
        // 2024-01-01T00:00:00Z: 32-bit form.
        let t = GoTime {
            secs: 1_704_067_200,
            nanos: 0,
        };
        assert_eq!(encode(&t).unwrap(), [0xd6, 0xff, 0x65, 0x92, 0x00, 0x80]);
        // With nanoseconds: 64-bit form.
        let t = GoTime {
            secs: 1_704_067_200,
            nanos: 7,
        };
        assert_eq!(&encode(&t).unwrap()[..2], [0xd7, 0xff]);
        // Go's zero time needs the 96-bit form.
        let z = encode(&GoTime::ZERO).unwrap();
        assert_eq!(&z[..3], [0xc7, 0x0c, 0xff]);
        for t in [
            GoTime::ZERO,
            GoTime {
                secs: 5,
                nanos: 999_999_999,
            },
        ] {
            assert_eq!(decode::<GoTime>(&encode(&t).unwrap()).unwrap(), t);
        }
    }

    #[test]
    fn time_accepts_rfc3339_and_nil() {
        let bytes = rmp_serde::to_vec(&"2024-01-01T00:00:00Z").unwrap();
        assert_eq!(decode::<GoTime>(&bytes).unwrap().secs, 1_704_067_200);
        assert_eq!(decode::<GoTime>(&[0xc0]).unwrap(), GoTime::ZERO);
        assert!(decode::<GoTime>(&[0xd6, 0x05, 0, 0, 0, 0]).is_err());
    }
}
