import ArgumentParser
import VigilProxy

struct Certs: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Certificate tools.", subcommands: [Dev.self])

    struct Dev: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write a development CA and leaf certificates with SPIFFE identities (ECDSA P-256).",
            discussion: """
                Writes DIR/ca.pem and DIR/ca-key.pem, and for each --name a certificate and key named after it:
                spiffe://corp/ns/acme/sa/web becomes corp-ns-acme-sa-web.pem and corp-ns-acme-sa-web-key.pem.
                A name with :// goes into a URI SAN, anything else into a DNS SAN; every leaf is also valid for
                localhost and 127.0.0.1, and for both server and client use. Keys are written with mode 0600.
                For development only: the CA key sits beside the certificates.
                """)

        @Argument(help: "The directory to write into (created if missing).")
        var directory: String

        @Option(name: .long, help: "An identity to issue a certificate for (repeatable).")
        var name: [String] = []

        @Option(name: .long, help: "Days the leaf certificates are valid.")
        var days: Int = 90

        func run() throws {
            guard !name.isEmpty else {
                throw ValidationError("give at least one --name, e.g. --name spiffe://corp/ns/acme/sa/web")
            }
            let ca = try DevCertificateAuthority()
            let written = try ca.write(to: directory, identities: name, validityDays: days)
            for path in written { print(path) }
        }
    }
}
