//! Tensors on the wire: dtype, shape and raw little-endian bytes.

use serde::{Deserialize, Serialize};

/// Element types the pipeline carries. ONNX models with other input types are refused at push.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F64,
    I8,
    U8,
    I16,
    I32,
    I64,
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::I16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::Bool => "bool",
        };
        f.write_str(s)
    }
}

/// A named tensor. `data` is `shape.product() * dtype.size()` bytes, row-major, little-endian.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    #[serde(deserialize_with = "crate::bounded::dims")]
    pub shape: Vec<u64>,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Hard bounds on tensors, checked before anything is allocated from their claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_rank: usize,
    pub max_tensors: usize,
    pub max_tensor_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_rank: 8, max_tensors: 16, max_tensor_bytes: 16 << 20 }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TensorError {
    #[error("tensor `{name}` has rank {rank}, over the limit of {max}")]
    RankTooHigh { name: String, rank: usize, max: usize },
    #[error("tensor `{name}` has a shape whose size overflows, or a dimension over i64: {shape:?}")]
    HostileShape { name: String, shape: Vec<u64> },
    #[error("tensor `{name}` would take {bytes} bytes, over the limit of {max}")]
    TooLarge { name: String, bytes: u128, max: usize },
    /// `expected` and `actual` are in bytes; the message counts values.
    #[error("tensor `{name}` of shape {shape:?} needs {} {dtype} values, got {}", .expected / .dtype.size(), values_in(*.actual, *.dtype))]
    LengthMismatch { name: String, shape: Vec<u64>, dtype: DType, expected: usize, actual: usize },
}

/// `bytes` of `dtype` as a count of values, for messages.
fn values_in(bytes: usize, dtype: DType) -> String {
    if bytes.is_multiple_of(dtype.size()) {
        (bytes / dtype.size()).to_string()
    } else {
        format!("{bytes} bytes, not a whole number of values")
    }
}

impl Tensor {
    /// Builds a tensor from typed values (little-endian on the wire, whatever the host).
    pub fn from_values<T: Element>(name: &str, shape: Vec<u64>, values: &[T]) -> Tensor {
        let mut data = Vec::with_capacity(values.len() * T::DTYPE.size());
        for v in values {
            v.write_le(&mut data);
        }
        Tensor { name: name.to_string(), dtype: T::DTYPE, shape, data }
    }

    /// Number of elements, checked: `None` when the product overflows.
    pub fn checked_elements(shape: &[u64]) -> Option<u64> {
        shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// Checks rank, size and that `data` is exactly as long as dtype and shape say.
    pub fn validate(&self, limits: &Limits) -> Result<(), TensorError> {
        if self.shape.len() > limits.max_rank {
            return Err(TensorError::RankTooHigh {
                name: self.name.clone(),
                rank: self.shape.len(),
                max: limits.max_rank,
            });
        }
        let hostile = || TensorError::HostileShape { name: self.name.clone(), shape: self.shape.clone() };
        // ONNX dimensions are i64: a larger one (possible with zero elements) would turn negative.
        if self.shape.iter().any(|&d| d > i64::MAX as u64) {
            return Err(hostile());
        }
        let elements = Self::checked_elements(&self.shape).ok_or_else(hostile)?;
        let bytes = (elements as u128) * self.dtype.size() as u128;
        if bytes > limits.max_tensor_bytes as u128 {
            return Err(TensorError::TooLarge { name: self.name.clone(), bytes, max: limits.max_tensor_bytes });
        }
        if bytes != self.data.len() as u128 {
            return Err(TensorError::LengthMismatch {
                name: self.name.clone(),
                shape: self.shape.clone(),
                dtype: self.dtype,
                expected: bytes as usize,
                actual: self.data.len(),
            });
        }
        Ok(())
    }

    /// Decodes the elements as `T`; `None` if the dtype is not `T`'s.
    pub fn values<T: Element>(&self) -> Option<Vec<T>> {
        if self.dtype != T::DTYPE {
            return None;
        }
        Some(self.data.chunks_exact(T::DTYPE.size()).map(T::read_le).collect())
    }

    /// Elements widened to f64 (bools as 0/1), for comparisons.
    pub fn to_f64(&self) -> Vec<f64> {
        let d = &self.data;
        match self.dtype {
            DType::F32 => d.chunks_exact(4).map(|c| f32::read_le(c) as f64).collect(),
            DType::F64 => d.chunks_exact(8).map(f64::read_le).collect(),
            DType::I8 => d.iter().map(|&b| b as i8 as f64).collect(),
            DType::U8 | DType::Bool => d.iter().map(|&b| b as f64).collect(),
            DType::I16 => d.chunks_exact(2).map(|c| i16::read_le(c) as f64).collect(),
            DType::I32 => d.chunks_exact(4).map(|c| i32::read_le(c) as f64).collect(),
            DType::I64 => d.chunks_exact(8).map(|c| i64::read_le(c) as f64).collect(),
        }
    }
}

/// A Rust element type with a wire dtype.
pub trait Element: Copy {
    const DTYPE: DType;
    fn write_le(&self, out: &mut Vec<u8>);
    /// Reads one element from exactly `DTYPE.size()` bytes.
    fn read_le(bytes: &[u8]) -> Self;
}

macro_rules! element {
    ($t:ty, $d:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            fn write_le(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn read_le(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("chunk of the element's size"))
            }
        }
    };
}
element!(f32, DType::F32);
element!(f64, DType::F64);
element!(i8, DType::I8);
element!(u8, DType::U8);
element!(i16, DType::I16);
element!(i32, DType::I32);
element!(i64, DType::I64);

impl Element for bool {
    const DTYPE: DType = DType::Bool;
    fn write_le(&self, out: &mut Vec<u8>) {
        out.push(*self as u8);
    }
    fn read_le(bytes: &[u8]) -> Self {
        bytes[0] != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrips_values_little_endian() {
        let t = Tensor::from_values("x", vec![2, 2], &[1.0f32, -2.5, 3.0, 0.0]);
        assert_eq!(&t.data[..4], &1.0f32.to_le_bytes());
        assert_eq!(t.values::<f32>().unwrap(), vec![1.0, -2.5, 3.0, 0.0]);
        assert!(t.values::<i64>().is_none());
        t.validate(&Limits::default()).unwrap();
    }

    #[test]
    fn rejects_overflowing_shape_before_allocating() {
        let t = Tensor { name: "x".into(), dtype: DType::F32, shape: vec![u64::MAX, 3], data: vec![] };
        assert!(matches!(t.validate(&Limits::default()), Err(TensorError::HostileShape { .. })));
    }

    #[test]
    fn rejects_length_mismatch_and_oversize() {
        let t = Tensor { name: "x".into(), dtype: DType::I64, shape: vec![2], data: vec![0; 15] };
        assert!(matches!(t.validate(&Limits::default()), Err(TensorError::LengthMismatch { expected: 16, .. })));
        assert_eq!(
            t.validate(&Limits::default()).unwrap_err().to_string(),
            "tensor `x` of shape [2] needs 2 i64 values, got 15 bytes, not a whole number of values"
        );
        let short = Tensor::from_values("x", vec![1, 4], &[0f32; 3]);
        assert_eq!(
            short.validate(&Limits::default()).unwrap_err().to_string(),
            "tensor `x` of shape [1, 4] needs 4 f32 values, got 3"
        );
        let big = Tensor { name: "x".into(), dtype: DType::F32, shape: vec![1 << 30], data: vec![] };
        assert!(matches!(big.validate(&Limits::default()), Err(TensorError::TooLarge { .. })));
        let deep = Tensor { name: "x".into(), dtype: DType::U8, shape: vec![1; 9], data: vec![0] };
        assert!(matches!(deep.validate(&Limits::default()), Err(TensorError::RankTooHigh { .. })));
    }
}
