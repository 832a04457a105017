// A Go server whose handler reads the connection to its end and returns
// without closing it: the leak, in Go.
package main

import (
	"fmt"
	"net"
	"os"
)

//go:noinline
func handle(c net.Conn) {
	buf := make([]byte, 512)
	for {
		if _, err := c.Read(buf); err != nil {
			return // EOF: and c is never closed
		}
	}
}

func main() {
	l, err := net.Listen("tcp", "127.0.0.1:"+os.Args[1])
	if err != nil {
		os.Exit(1)
	}
	fmt.Println("ready")
	for {
		c, err := l.Accept()
		if err == nil {
			go handle(c)
		}
	}
}
