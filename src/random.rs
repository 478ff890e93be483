//! Random values from the system's random source: API tokens, event tickets, idempotency keys,
//! outbox markers, JWT ids.

/// `N` bytes from the system's random source, as hex.
pub fn random_hex<const N: usize>() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; N];
    getrandom::getrandom(&mut bytes)?;
    Ok(hex::encode(bytes))
}
