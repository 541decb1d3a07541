//! Sequences capped while they are decoded, so that a message's memory stays within a small
//! multiple of its bytes: an empty tensor costs a few bytes on the wire and about a hundred
//! in memory, so without a cap 4 MiB of them would take some 70 MiB. The caps are far above
//! what ingress admits (`Limits`), so they refuse only hostile messages.

use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};

use crate::tensor::Tensor;

/// Most tensors in one message.
pub const MAX_TENSORS: usize = 256;
/// Most dimensions of one tensor.
pub const MAX_DIMS: usize = 64;

/// `#[serde(deserialize_with)]` for a message's tensors.
pub fn tensors<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Tensor>, D::Error> {
    capped(d, MAX_TENSORS)
}

/// `#[serde(deserialize_with)]` for a tensor's shape.
pub fn dims<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    capped(d, MAX_DIMS)
}

fn capped<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D, max: usize) -> Result<Vec<T>, D::Error> {
    d.deserialize_seq(Capped { max, item: PhantomData })
}

struct Capped<T> {
    max: usize,
    item: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Capped<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "a sequence of at most {} elements", self.max)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        // MessagePack states the length up front: refuse before reading an element.
        if let Some(n) = seq.size_hint().filter(|n| *n > self.max) {
            return Err(A::Error::invalid_length(n, &self));
        }
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            if out.len() == self.max {
                return Err(A::Error::invalid_length(self.max + 1, &self));
            }
            out.push(item);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, DecodeError, SubmitRequest, Tensor, decode, encode};

    #[test]
    fn too_many_tensors_or_dims_are_refused_while_decoding() {
        let empty = || Tensor { name: String::new(), dtype: DType::U8, shape: vec![0], data: vec![] };
        let ok = SubmitRequest::new("m", vec![empty(); super::MAX_TENSORS]);
        assert!(decode::<SubmitRequest>(&encode(&ok), 1 << 20).is_ok());
        let many = SubmitRequest::new("m", vec![empty(); super::MAX_TENSORS + 1]);
        assert!(
            matches!(decode::<SubmitRequest>(&encode(&many), 1 << 20), Err(DecodeError::Malformed(e)) if e.contains("at most"))
        );
        let deep = Tensor { shape: vec![1; super::MAX_DIMS + 1], ..empty() };
        let deep = SubmitRequest::new("m", vec![deep]);
        assert!(matches!(decode::<SubmitRequest>(&encode(&deep), 1 << 20), Err(DecodeError::Malformed(_))));
    }
}
