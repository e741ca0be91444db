//! Event ids: ULIDs, spelled in lowercase as the outbox stores them.

/// A new lowercase ULID, the spelling the outbox uses.
pub fn new_event_id() -> String {
    ulid::Ulid::new().to_string().to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_lowercase_ulids_and_distinct() {
        let (a, b) = (super::new_event_id(), super::new_event_id());
        assert_eq!(a.len(), 26);
        assert_eq!(a, a.to_ascii_lowercase());
        assert!(ulid::Ulid::from_string(&a.to_ascii_uppercase()).is_ok());
        assert_ne!(a, b);
    }
}
