//! Friendly random names for VMs created without one, e.g. `calm-otter-42`.

const ADJECTIVES: &[&str] = &[
    "amber", "brave", "calm", "clever", "cosy", "crisp", "eager", "fancy", "gentle", "happy",
    "jolly", "keen", "lucky", "mellow", "nimble", "proud", "quiet", "rapid", "shiny", "snug",
    "sunny", "swift", "tidy", "witty",
];
const NOUNS: &[&str] = &[
    "badger", "comet", "falcon", "fern", "harbor", "heron", "lantern", "maple", "meadow", "nook",
    "otter", "pebble", "quill", "raven", "river", "robin", "sparrow", "spruce", "thistle",
    "walrus", "willow", "wren",
];

pub fn friendly() -> String {
    use rand::seq::IndexedRandom;
    let mut rng = rand::rng();
    let adjective = ADJECTIVES.choose(&mut rng).copied().unwrap_or("calm");
    let noun = NOUNS.choose(&mut rng).copied().unwrap_or("nook");
    format!("{adjective}-{noun}-{}", rand::random_range(10..100))
}

#[cfg(test)]
mod tests {
    #[test]
    fn friendly_names_are_valid_names() {
        for _ in 0..200 {
            let name = super::friendly();
            assert!(nook_api::validate_name(&name).is_ok(), "{name}");
        }
    }
}
