//! Config text for unit tests: one password hash and one way to write a
//! tenant, instead of a copy in every module's tests.

/// An argon2id PHC string with the crate's default costs (its password is
/// not used by any unit test).
pub const TEST_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Zb7K+3e0fJrDPGjR2uUnEEc2F5w4ujSgmvNC6uxjl5M";

/// A plain listener on a free loopback port that relays for loopback
/// clients without AUTH.
pub const RELAY_LISTENER: &str = "[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"none\"\nauth = \"none\"\ntrusted_networks = [\"127.0.0.0/8\"]\n";

/// A `[[tenant]]` table: `name` is also the username; `allowed_senders` is
/// the TOML array's inside (`"*@acme.test"`).
pub fn tenant(name: &str, allowed_senders: &str) -> String {
    format!(
        "[[tenant]]\nname = \"{name}\"\nusername = \"{name}\"\npassword_hash = \"{TEST_HASH}\"\nallowed_senders = [{allowed_senders}]\n"
    )
}
